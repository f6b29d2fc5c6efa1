"""GRPO: critic-free RL from groups of completions per prompt (Shao et al. 2024), as TRL documents it.

Recipe features:

- ``num_generations`` completions per prompt; each one's advantage is its reward minus its group's
  mean, divided by the group's std (``scale_rewards group``), the batch's (``batch``) or nothing
  (``none``, Dr. GRPO). Every token of a completion shares its advantage.
- Clipped per-token ratio to the sampling policy (``epsilon``, and ``epsilon_high`` for DAPO's
  asymmetric "clip higher"), KL to the frozen reference as a k3 term in the loss (``beta``; 0 =
  none, the KL is still measured and logged), aggregation ``loss_type`` ``grpo`` | ``dapo`` | ``dr_grpo``.
- ``num_iterations`` passes over each batch in mini-batches of ``mini_batch_size`` completions.
- Groups whose completions all scored the same carry no signal: their share is logged
  (``zero_variance_groups``) and a step where every group is flat skips its update, with a warning.
- Everything else as ``rlhf ppo``: roles on one base with the frozen lower layers run once per
  rollout, reward model / judge / function, EOS penalty, monitor, checkpoints and exact resume.

Limits: no critic means no per-token credit: a long answer's tokens share one advantage. Under N
processes a group never spans two ranks (prompts are split, not completions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from rlhfkit.config import option
from rlhfkit.rl.losses import group_advantages, grpo_loss, kl_per_token, zero_variance_share
from rlhfkit.rl.run import OnlineTrainer, RLConfig, run_online


@dataclass
class GRPOConfig(RLConfig):
    """Options of ``rlhf grpo``."""

    batch_size: int = option(4, "Prompts per step over all processes; each gets num_generations completions.")
    num_generations: int = option(8, "Completions per prompt (the group), as TRL.")
    mini_batch_size: int = option(8, "Completions per gradient step, over all processes.")
    num_iterations: int = option(1, "Passes over each batch (TRL's mu).")
    beta: float = option(0.04, "Weight of the k3 KL to the reference in the loss (0 = none; TRL 1.x defaults to 0).")
    epsilon: float = option(0.2, "Ratio clip, lower side (and upper side unless epsilon_high is set).")
    epsilon_high: float | None = option(None, "Ratio clip, upper side (DAPO's clip-higher; unset = epsilon).")
    scale_rewards: str = option("group", "Advantage scaling: group (std of the group), batch, or none (Dr. GRPO).")
    loss_type: str = option(
        "dapo", "Loss aggregation: grpo (per sequence), dapo (per token), dr_grpo (per max length)."
    )

    def checks(self) -> dict[str, bool]:
        return {
            **super().checks(),
            "num_generations must be >= 2 (a group needs others to compare with)": self.num_generations >= 2,
            "mini_batch_size must be >= 1": self.mini_batch_size >= 1,
            "num_iterations must be >= 1": self.num_iterations >= 1,
            "beta must be >= 0": self.beta >= 0,
            "epsilon must be in (0, 1)": 0 < self.epsilon < 1,
            "epsilon_high must be > 0": self.epsilon_high is None or self.epsilon_high > 0,
            "scale_rewards must be group, batch or none": self.scale_rewards in ("group", "batch", "none"),
            "loss_type must be grpo, dapo or dr_grpo": self.loss_type in ("grpo", "dapo", "dr_grpo"),
        }


class GRPOTrainer(OnlineTrainer):
    algo = "grpo"

    def __init__(self, cfg: GRPOConfig, accelerator: Any = None) -> None:
        super().__init__(cfg, cfg.num_generations, cfg.mini_batch_size, accelerator)
        self.cfg: GRPOConfig = cfg

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        k = cfg.num_generations
        epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        with self.running():
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                # 1. Rollout: k completions per prompt, scored (EOS rule applied), with the sampling
                #    policy's and the reference's log-probs of every response token.
                r, timing = self.rollout(self.take_prompts())
                t0 = time.perf_counter()
                g = self.gather(r)  # the whole batch's numbers (this rank's rollout alone with one process)
                mask = g.response_mask
                # 2. Group advantages: each completion against the other completions of its prompt.
                advantages = group_advantages(g.penalized, k, cfg.scale_rewards)
                flat_groups = zero_variance_share(g.penalized, k)
                # 3. Every group flat: nothing to learn from this batch.
                if flat_groups == 1.0:
                    self.warn_no_signal(g, "group")
                # 4. Clipped policy-gradient passes over mini-batches, k3 KL to the reference in the loss.
                # dapo: every optimizer step divides by the batch's tokens per mini-batch (TRL's
                # normaliser), not by its own mini-batch's count (that would be bnpo); this rank's share.
                rows = len(r.response_mask)
                tokens_per_step = float(r.response_mask.sum()) * min(cfg.mini_batch_size // self.world, rows) / rows
                loss_fn = partial(
                    grpo_loss,
                    epsilon_low=cfg.epsilon,
                    epsilon_high=epsilon_high,
                    beta=cfg.beta,
                    loss_type=cfg.loss_type,
                    max_tokens=cfg.max_new_tokens,
                    tokens_in_batch=tokens_per_step,
                )
                per_row = {
                    "old_logprobs": g.logprobs,
                    "ref_logprobs": g.ref_logprobs if cfg.beta else None,
                    "advantages": advantages,
                    "mask": mask,
                }
                stats = ("clip_frac", "approx_kl", "kl_ref")
                update = self.policy_passes(
                    r,
                    cfg.num_iterations,
                    cfg.mini_batch_size,
                    loss_fn,
                    per_row,
                    stats,
                    flat_groups < 1.0,
                    tokens_per_step if cfg.loss_type == "dapo" else None,  # else the loss averages over rows
                )
                timing["time_train"] = time.perf_counter() - t0
                # 5. Log, monitor, checkpoint; stop at the budget, a reward threshold, hacking or runaway KL.
                seq_kl = (kl_per_token(g.logprobs, g.ref_logprobs, "k1") * mask).sum(-1)
                metrics = {
                    **self.rollout_metrics(g, seq_kl),
                    "beta": cfg.beta,
                    **update,
                    **self.group_metrics(g, advantages, flat_groups),
                }
                if self.end_step(metrics, timing, started):
                    break
        return self.finish()

    def card_method(self) -> str:
        return "GRPO (group-relative advantages, no critic) against a reward with a KL term to the base model"

    def card_settings(self) -> str:
        cfg = self.cfg
        return f"beta {cfg.beta}, loss {cfg.loss_type}, reward scaling {cfg.scale_rewards}"


def run_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """Start a GRPO run, or continue one with ``resume``; returns the summary of the last step."""
    return run_online(GRPOTrainer, cfg)

"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), critic-free, as TRL documents it.

Recipe features:

- ``num_generations`` completions per prompt; the whole response is one action. Its reward is the
  score minus ``kl_coef`` times its KL to the frozen reference (summed k1 over its tokens), and its
  advantage that reward minus the mean reward of the other completions of the same prompt.
  ``target_kl`` steers ``kl_coef`` with PPO's controller (horizon in steps, the start as floor).
- Sequence-level ratio to the sampling policy, clipped (``epsilon``, ``epsilon_high``), over
  ``num_iterations`` passes in mini-batches of ``mini_batch_size`` completions; optional advantage
  whitening (``normalize_advantages``).
- Groups whose completions all scored the same carry no signal: their share is logged
  (``zero_variance_groups``) and a step where every group is flat skips its update, with a warning.
- Everything else as ``rlhf ppo``: roles on one base with the frozen lower layers run once per
  rollout, reward model / judge / function, EOS penalty, monitor, checkpoints and exact resume.

Limits: the KL term is in the reward, so a flat score still pays for staying near the reference
only through the baseline differences within a group. Under N processes a group never spans two
ranks (prompts are split, not completions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from rlhfkit.config import option
from rlhfkit.rl.losses import (
    KLController,
    kl_per_token,
    leave_one_out_advantages,
    sequence_clip_loss,
    zero_variance_share,
)
from rlhfkit.rl.run import OnlineTrainer, RLConfig, run_online


@dataclass
class RLOOConfig(RLConfig):
    """Options of ``rlhf rloo``."""

    batch_size: int = option(8, "Prompts per step over all processes; each gets num_generations completions.")
    num_generations: int = option(2, "Completions per prompt (the group), as TRL.")
    mini_batch_size: int = option(8, "Completions per gradient step, over all processes.")
    num_iterations: int = option(1, "Passes over each batch.")
    kl_coef: float = option(0.05, "KL penalty coefficient in the sequence reward (the floor of an adaptive one).")
    target_kl: float | None = option(
        None, "Adaptive KL controller target (nats per sequence); unset = fixed coefficient."
    )
    kl_horizon: float = option(5.0, "Adaptive KL controller horizon in steps.")
    epsilon: float = option(0.2, "Sequence ratio clip, lower side (and upper side unless epsilon_high is set).")
    epsilon_high: float | None = option(None, "Sequence ratio clip, upper side (unset = epsilon).")
    normalize_advantages: bool = option(False, "Whiten the leave-one-out advantages over the batch.")

    def checks(self) -> dict[str, bool]:
        return {
            **super().checks(),
            "num_generations must be >= 2 (the baseline is the other completions)": self.num_generations >= 2,
            "mini_batch_size must be >= 1": self.mini_batch_size >= 1,
            "num_iterations must be >= 1": self.num_iterations >= 1,
            "kl_coef must be >= 0": self.kl_coef >= 0,
            "target_kl must be > 0": self.target_kl is None or self.target_kl > 0,
            "kl_horizon must be >= 1 (steps)": self.kl_horizon >= 1,
            "epsilon must be in (0, 1)": 0 < self.epsilon < 1,
            "epsilon_high must be > 0": self.epsilon_high is None or self.epsilon_high > 0,
        }


class RLOOTrainer(OnlineTrainer):
    algo = "rloo"

    def __init__(self, cfg: RLOOConfig, accelerator: Any = None) -> None:
        super().__init__(cfg, cfg.num_generations, cfg.mini_batch_size, accelerator)
        self.cfg: RLOOConfig = cfg
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)

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
                # 2. Sequence reward: the score minus kl_coef x the response's KL to the reference.
                seq_kl = (kl_per_token(g.logprobs, g.ref_logprobs, "k1") * mask).sum(-1)
                rewards = g.penalized - self.kl_ctl.value * seq_kl
                # 3. Leave-one-out advantages: each reward against the mean of its prompt's others.
                advantages = leave_one_out_advantages(rewards, k)
                if cfg.normalize_advantages:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                flat_groups = zero_variance_share(g.penalized, k)
                if flat_groups == 1.0:
                    self.warn_no_signal(g, "group")
                # 4. Clipped sequence-ratio passes over mini-batches.
                loss_fn = partial(sequence_clip_loss, epsilon_low=cfg.epsilon, epsilon_high=epsilon_high)
                per_row = {"old_logprobs": g.logprobs, "advantages": advantages, "mask": mask}
                update = self.policy_passes(
                    r, cfg.num_iterations, cfg.mini_batch_size, loss_fn, per_row, ("clip_frac", "approx_kl"),
                    flat_groups < 1.0,
                )  # fmt: skip
                timing["time_train"] = time.perf_counter() - t0
                metrics = {
                    **self.rollout_metrics(g, seq_kl),
                    "kl_coef": self.kl_ctl.value,
                    "rlhf_reward": float(rewards.mean()),
                    **update,
                    **self.group_metrics(g, advantages, flat_groups),
                }
                # 5. The KL controller sees this step's KL.
                self.kl_ctl.update(metrics["kl"])
                # 6. Log, monitor, checkpoint; stop at the budget, a reward threshold, hacking or runaway KL.
                if self.end_step(metrics, timing, started):
                    break
        return self.finish()

    def card_method(self) -> str:
        return "RLOO (leave-one-out baseline, no critic) against a reward with a KL penalty to the base model"


def run_rloo(cfg: RLOOConfig) -> dict[str, Any]:
    """Start an RLOO run, or continue one with ``resume``; returns the summary of the last step."""
    return run_online(RLOOTrainer, cfg)

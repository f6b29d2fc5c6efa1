"""PPO fine-tuning of a policy against a reward, with a KL penalty to the frozen reference.

Recipe features:

- One frozen base serves every role (``rl.roles``): the policy and the critic are their own LoRA
  adapters (the value loss never moves the policy), the reference is the base with adapters off,
  a reward model trained on the same backbone is one more frozen adapter, from which the critic
  starts. The frozen lower layers run once per rollout. ``--full`` keeps a frozen reference copy.
- Rewards (``rl.scoring``): a reward-model directory, ``judge:NAME`` or ``module:function``. The
  score goes on the last response token, a per-token KL penalty (k1 or k3) on every token;
  responses cut without EOS get ``missing_eos_penalty`` (replace or subtract). A batch whose scores
  are all equal teaches nothing: its policy update is skipped, with a warning.
- GAE (gamma, lambda), advantages whitened over the batch, clipped policy ratio and clipped value
  loss, several PPO epochs over shuffled mini-batches (ended early past ``target_approx_kl``),
  gradient clipping (policy and critic apart), dropout off, an optional critic warm-up, and an
  adaptive KL controller (``target_kl``, horizon in steps) or a fixed coefficient.
- Stops at ``max_steps``, at a moving-average reward of ``reward_threshold``, on a reward-hacking
  alert with ``stop_on_hacking``, or with a clear message when a loss or the KL turns NaN or the KL
  passes ``max_kl``. Checkpoints hold everything: ``rlhf ppo --resume RUN_DIR`` reproduces a
  straight run's metrics.
- N processes (``torchrun`` / ``accelerate launch``, ``rlhfkit.distributed``): each rank rolls out
  its share of the prompts; rewards, GAE and whitening run on the gathered batch; each mini-batch's
  loss is weighted by the rank's share of its tokens, so the all-reduced gradient is the global
  mini-batch's. ``--full --fsdp`` shards policy, critic and reference with FSDP2.

Limits: sampling is plain temperature sampling (top-p would make the rollout distribution differ
from the one PPO scores); GPUs are written for but were not available to test on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import option
from rlhfkit.distributed import gather_rows, mean_over_ranks, root_gathered
from rlhfkit.rl.losses import (
    KLController,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from rlhfkit.rl.rollout import Rollout
from rlhfkit.rl.run import OnlineTrainer, RLConfig, run_online


@dataclass
class PPOConfig(RLConfig):
    """Options of ``rlhf ppo``."""

    mini_batch_size: int = option(8, "Rollouts per gradient step, over all processes.")
    ppo_epochs: int = option(4, "Passes over each rollout batch.")
    target_approx_kl: float | None = option(
        None, "Stop a step's PPO epochs once a mini-batch's approx KL(old || new) passes this (unset = run them all)."
    )
    critic_warmup_steps: int = option(0, "First N steps update the critic only (the policy waits for sane values).")
    kl_coef: float = option(0.05, "KL penalty coefficient (the starting value, and the floor, of an adaptive one).")
    target_kl: float | None = option(
        None, "Adaptive KL controller target (nats per sequence); unset = fixed coefficient."
    )
    kl_horizon: float = option(
        5.0, "Adaptive KL controller horizon in steps: the coefficient moves by up to a factor e^(1/horizon) a step."
    )
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward: k1 (log ratio) or k3.")
    whiten_rewards: bool = option(False, "Whiten the per-token rewards over the batch before GAE.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    clip_range: float = option(0.2, "Policy ratio clip.")
    clip_range_value: float = option(0.2, "Value clip.")
    vf_coef: float = option(0.1, "Value loss coefficient.")

    def checks(self) -> dict[str, bool]:
        return {
            **super().checks(),
            "mini_batch_size must be in [1, batch_size]": 1 <= self.mini_batch_size <= self.batch_size,
            "ppo_epochs must be >= 1": self.ppo_epochs >= 1,
            "kl_estimator must be k1 or k3": self.kl_estimator in ("k1", "k3"),
            "target_kl must be > 0": self.target_kl is None or self.target_kl > 0,
            "kl_horizon must be >= 1 (steps)": self.kl_horizon >= 1,
            "target_approx_kl must be > 0": self.target_approx_kl is None or self.target_approx_kl > 0,
            "critic_warmup_steps must be >= 0": self.critic_warmup_steps >= 0,
        }


class PPOTrainer(OnlineTrainer):
    """PPO with a critic: ``train`` is the loop, ``ppo_step`` the update of one rollout batch."""

    algo = "ppo"
    critic = True

    def __init__(self, cfg: PPOConfig, accelerator: Any = None) -> None:
        super().__init__(cfg, group_size=1, mini_batch_size=cfg.mini_batch_size, accelerator=accelerator)
        self.cfg: PPOConfig = cfg
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        with self.running():
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                # 1. Rollout: one completion per prompt, scored, with the policy's, the reference's and
                #    the critic's numbers for every response token.
                rollout, timing = self.rollout(self.take_prompts())
                # 2-5. The update: per-token rewards, GAE, clipped epochs over mini-batches.
                t0 = time.perf_counter()
                metrics = self.ppo_step(rollout)
                timing["time_train"] = time.perf_counter() - t0
                # 6. The KL controller sees this step's KL.
                self.kl_ctl.update(metrics["kl"])
                # 7. Log, monitor, checkpoint; stop at the budget, a reward threshold, hacking or runaway KL.
                if self.end_step(metrics, timing, started):
                    break
        return self.finish()

    def rollout(self, prompt_idx: list[int]) -> tuple[Rollout, dict[str, float]]:
        rollout, timing = super().rollout(prompt_idx)
        if self.value_bias_from_scores and self.step == 0:
            # A critic with no reward head to start from predicts the first batch's mean score
            # (its weights are 0: every value is the bias) instead of noise.
            core = self.core
            with torch.no_grad():
                # Set on the parameter itself (with --fsdp each rank's shard), then read gathered.
                core.value_head.bias.fill_(float(gather_rows(self.accelerator, rollout.penalized).mean()))
                with root_gathered(core):
                    rollout.values = core.values(rollout.ids, rollout.mask, rollout.lower, rollout.query_len)
        return rollout, timing

    def ppo_step(self, r: Rollout) -> dict[str, float]:
        """One update from this rank's rollout ``r``; the advantages come from the whole (gathered) batch."""
        cfg = self.cfg
        g = self.gather(r)
        rmask = g.response_mask
        assert g.values is not None and r.values is not None
        # 2. Per-token rewards: -kl_coef * KL on every token, the (EOS-penalised) score on the last.
        kl = kl_per_token(g.logprobs, g.ref_logprobs, cfg.kl_estimator) * rmask
        rewards = token_rewards(g.penalized, kl, self.kl_ctl.value, rmask)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, rmask, shift_mean=False)
        # 3. Advantages (GAE) against the critic's values, whitened over the batch.
        advantages, returns = gae(rewards, g.values, rmask, cfg.gamma, cfg.lam)
        advantage_std_raw = float(masked_var(advantages, rmask).sqrt())
        advantages = whiten(advantages, rmask)
        # 4. Does the policy learn this step? Not while the critic warms up, and not from scores that
        #    are all equal: whitened advantages would then follow the critic's noise.
        no_signal = len(g.penalized) > 1 and float(g.penalized.std()) < 1e-6
        if no_signal:
            self.warn_no_signal(g)
        update_policy = self.step >= cfg.critic_warmup_steps and not no_signal
        learning_rate = self.scheduler.get_last_lr()[0]

        # 5. PPO epochs over shuffled mini-batches of this rank's rows (the model stays in eval mode:
        #    dropout off), ended early once the policy moved past target_approx_kl from the one that sampled.
        own = self.local({"advantages": advantages, "returns": returns}, r)
        local_mask = r.response_mask
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl")
        }
        updates = 0
        for mb in self.minibatches(r.ids.shape[0], cfg.mini_batch_size, cfg.ppo_epochs):
            lower = r.lower[mb] if r.lower is not None else None
            logprobs, values, _ = self.model(
                r.ids[mb], r.mask[mb], lower, r.query_len, cfg.temperature, with_policy=update_policy
            )
            if update_policy:
                pg_loss, clip_frac, approx_kl = policy_loss(
                    logprobs, r.logprobs[mb], own["advantages"][mb], local_mask[mb], cfg.clip_range
                )
            else:  # value updates only
                pg_loss = clip_frac = approx_kl = torch.zeros((), device=self.device)
            vf_loss, vf_clip = value_loss(
                values, r.values[mb], own["returns"][mb], local_mask[mb], cfg.clip_range_value
            )
            tokens = float(local_mask[mb].sum())  # both losses average over the mini-batch's tokens
            self.optimizer_step(pg_loss + cfg.vf_coef * vf_loss, update_policy, tokens)
            updates += 1
            step_stats = {
                "policy_loss": float(pg_loss.detach()),
                "value_loss": float(vf_loss.detach()),
                "clip_frac": float(clip_frac),
                "value_clip_frac": float(vf_clip),
                "approx_kl": float(approx_kl),
            }
            step_stats = mean_over_ranks(self.accelerator, step_stats, tokens)
            for key, value in step_stats.items():
                stats[key].append(value)
            if update_policy and cfg.target_approx_kl is not None and step_stats["approx_kl"] > cfg.target_approx_kl:
                break
        self.advance_schedule()

        seq_kl = kl.sum(-1)
        return {
            **self.rollout_metrics(g, seq_kl),
            "kl_coef": self.kl_ctl.value,
            "rlhf_reward": float((g.penalized - self.kl_ctl.value * seq_kl).mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "updates": updates,
            "policy_updated": int(update_policy),
            "advantage_std_raw": advantage_std_raw,
            "value_mean": float(masked_mean(g.values, rmask)),
            "explained_variance": explained_variance(g.values, returns, rmask),
            "learning_rate": learning_rate,
        }

    def card_method(self) -> str:
        return "PPO against a reward with a KL penalty to the base model"

    def card_settings(self) -> str:
        return f"{self.cfg.ppo_epochs} PPO epochs, {super().card_settings()}"


def run_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Start a PPO run, or continue one with ``resume``; returns the summary of the last step."""
    return run_online(PPOTrainer, cfg)

"""The RLHF formulas of every online algorithm, each a small pure function tested against a hand computation.

Shapes: ``(batch, response_len)`` per-token tensors with a 0/1 ``mask`` that is 1 on real response
tokens (the EOS included) and 0 on the padding after it; group algorithms lay a batch out prompt by
prompt, ``k`` completions each (rows ``[p0 c0, p0 c1, ..., p1 c0, ...]``).

References: PPO: Ziegler et al. (2019), Stiennon et al. (2020) and the checklist of Huang et al.
(2024), "The N+ Implementation Details of RLHF with PPO". GRPO: Shao et al. (2024, DeepSeekMath),
DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025), as TRL's ``GRPOTrainer`` documents them. RLOO:
Ahmadian et al. (2024), "Back to Basics".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the batch (and zero mean unless ``shift_mean`` is False)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative per sample); k3 = (q/p - 1) - log(q/p)
    (unbiased and always >= 0, lower variance; Schulman's "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected k1 or k3)")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last 1 in each row of a right-padded mask (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Reward per token: ``-kl_coef * kl`` everywhere, plus the sequence score at the last token."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += scores
    return rewards


def apply_eos_penalty(
    scores: torch.Tensor, ended: torch.Tensor, penalty: float | None, mode: str = "replace"
) -> torch.Tensor:
    """The "EOS trick" for responses cut at the token limit without an EOS.

    ``replace``: their score becomes ``penalty`` (Huang et al. 2024). ``subtract``: their score is
    lowered by ``|penalty|`` (TRL's ``missing_eos_penalty``), which keeps the reward's ranking among
    cut responses: when every response is cut, ``replace`` leaves no signal at all.
    ``penalty=None`` keeps every score.
    """
    if penalty is None:
        return scores.clone()
    if mode == "replace":
        return torch.where(ended, scores, torch.full_like(scores, penalty))
    if mode == "subtract":
        return torch.where(ended, scores, scores - abs(penalty))
    raise ValueError(f"unknown EOS penalty mode {mode!r} (expected replace or subtract)")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response; returns (advantages, returns).

    The value after the last real token is 0 (the episode ends there), so padding never leaks in.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    returns = advantages + values
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss; also the fraction of clipped tokens and approx KL(old || new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)``; also the clipped fraction."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    clip_frac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clip_frac.detach()


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy at every position from normalised log-probabilities (one temporary the size of ``logp``)."""
    return logp.exp().mul_(logp).sum(-1).neg_()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens: 1 is a perfect critic, 0 one no
    better than a constant, below 0 one that adds noise to the advantages."""
    var_returns = float(masked_var(returns, mask))
    if var_returns == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var_returns


@dataclass
class KLController:
    """The KL coefficient: fixed, or steered towards ``target`` nats per sequence.

    Adaptive update once per step, proportional in log space (Ziegler et al. 2019's controller with
    its horizon counted in steps rather than rollouts)::

        coef = max(floor, coef * exp(clip(kl / target - 1, -1, 1) / horizon))

    so at twice the target (or more) the coefficient grows by a factor e^(1/horizon) a step
    (x1.22 with horizon 5: x7 in 10 steps): KL is held near its target within tens of steps. A
    horizon counted in rollouts (the paper's 10000 with 16 prompts a step) moved the coefficient by
    at most ~3% in 100 steps, which controls nothing. ``floor`` is the starting value: a run starts
    at KL 0, far under any target, and a coefficient free to shrink there winds down tenfold in the
    first 10 steps, then lets KL overshoot its target for the many steps it takes to climb back
    (measured: target 2 passed 3 nats at step 17 with the coefficient at 0.003).
    """

    value: float
    target: float | None = None
    horizon: float = 5.0
    floor: float | None = None

    def __post_init__(self) -> None:
        if self.floor is None:
            self.floor = self.value

    def update(self, current_kl: float) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -1.0), 1.0)
        self.value = max(self.floor, self.value * math.exp(error / self.horizon))

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
        self.floor = state.get("floor", self.value)


# ----------------------------------------------------------------------------------------------
# Group advantages (GRPO, RLOO): the other completions of the same prompt are the baseline


def group_advantages(rewards: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each of ``k`` completions per prompt: reward minus its group's mean, scaled.

    ``scale``: ``group`` divides by the group's std (+ ``eps``), ``batch`` by the whole batch's std,
    ``none`` not at all (Dr. GRPO: the std division over-weights near-unanimous groups).
    """
    grouped = rewards.view(-1, k)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(k) if k > 1 else torch.zeros_like(rewards)
        return centred / (std + eps)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), device=rewards.device)
        return centred / (std + eps)
    if scale == "none":
        return centred
    raise ValueError(f"unknown reward scaling {scale!r} (expected group, batch or none)")


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's advantage: each reward minus the mean of the other ``k - 1`` rewards of its prompt."""
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 completions per prompt")
    grouped = rewards.view(-1, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).view(-1)


def zero_variance_share(rewards: torch.Tensor, k: int) -> float:
    """Share of prompts whose ``k`` rewards are all equal: groups that carry no learning signal."""
    grouped = rewards.view(-1, k)
    return float(((grouped.max(dim=1).values - grouped.min(dim=1).values) < 1e-6).float().mean())


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    loss_type: str,
    max_tokens: int,
    tokens_in_batch: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped per-token objective with a k3 KL penalty to the reference; also clip share and KL.

    Per token: ``-min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta * k3`` with ``r`` the
    ratio to the sampling policy and ``A`` the sequence's advantage. Aggregation (``loss_type``):

    - ``grpo``: mean over each sequence's tokens, then over sequences (long answers weigh less per token);
    - ``dapo``: sum over the mini-batch's tokens / ``tokens_in_batch``: the rollout batch's token count
      divided by its number of mini-batches (TRL's normaliser: a long mini-batch weighs more), by
      default this mini-batch's own count (which is TRL's ``bnpo``);
    - ``dr_grpo``: sum over every token / (sequences x ``max_tokens``): no length bias at all.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = kl_per_token(logprobs, ref_logprobs, "k3") if ref_logprobs is not None else torch.zeros_like(logprobs)
    if beta != 0.0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (tokens_in_batch if tokens_in_batch else mask.sum().clamp(min=1))
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * max_tokens)
    else:
        raise ValueError(f"unknown loss type {loss_type!r} (expected grpo, dapo or dr_grpo)")
    stats = {
        "clip_frac": masked_mean((clipped < unclipped).float(), mask),  # the clipped term is the one used
        "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
        "kl_ref": masked_mean(kl, mask),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def sequence_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's objective: the whole response is one action, so one ratio per sequence, clipped.

    ``r = exp(sum_t (log pi - log pi_old))``, loss ``-mean(min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A))``.
    """
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1)
    ratio = torch.exp(seq_log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    stats = {
        "clip_frac": (clipped < unclipped).float().mean(),
        "approx_kl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
    }
    return loss, {k: v.detach() for k, v in stats.items()}

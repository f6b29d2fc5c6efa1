"""PPO formulas against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rl.losses import (
    KLController,
    apply_eos_penalty,
    entropy_from_logprobs,
    explained_variance,
    gae,
    group_advantages,
    grpo_loss,
    kl_per_token,
    leave_one_out_advantages,
    masked_mean,
    masked_var,
    policy_loss,
    sequence_clip_loss,
    token_rewards,
    value_loss,
    whiten,
    zero_variance_share,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-5)


def test_masked_mean_and_var() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert float(masked_var(x, mask)) == pytest.approx(1.0)  # unbiased var of 1, 2, 3


def test_whiten_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = whiten(x, mask)
    close(out, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, :2].tolist() == pytest.approx([2 - 1.0, 2 + 0.0], abs=1e-6)


def test_kl_estimators() -> None:
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    k1 = kl_per_token(logp, ref, "k1")
    assert k1.tolist() == pytest.approx([math.log(2), math.log(0.5)])
    k3 = kl_per_token(logp, ref, "k3")  # r = q/p: 0.5 and 2
    assert k3.tolist() == pytest.approx([(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2)])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_token_rewards_put_score_on_last_real_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, kl_coef=0.5, mask=mask)
    close(rewards, [[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 - 2.0]])


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])  # 9.0 sits on padding and must not leak in
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    delta1 = 1.0 + gamma * 0.0 - 0.2
    delta0 = 0.0 + gamma * 0.2 - 0.5
    a1 = delta1
    a0 = delta0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    close(advantages, [[a0, a1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.2, 0.0]])


def test_gae_with_lambda_one_gamma_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, 0.2, 0.7]])
    values = torch.tensor([[0.3, 0.1, 0.4]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    close(returns, [[1.0, 0.9, 0.7]])
    close(advantages, [[0.7, 0.8, 0.3]])


def test_policy_loss_clips_by_hand() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac, approx_kl = policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.5 clipped to 1.2 -> -1.2 ; token 1: min(0.5, 0.8) -> max(-0.5, -0.8) = -0.5
    # token 2: ratio 1.1, adv -2 -> max(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert float(clip_frac) == pytest.approx(1 / 3)
    assert float(approx_kl) == pytest.approx(0.5 * float((new**2).mean()))


def test_value_loss_clips_by_hand() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, clip_frac = value_loss(new, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: both 0.81
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.81) / 2)
    assert float(clip_frac) == pytest.approx(0.5)


def test_entropy_of_uniform() -> None:
    assert float(entropy_from_logprobs(torch.log_softmax(torch.zeros(4), -1))) == pytest.approx(math.log(4))
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert float(entropy_from_logprobs(torch.tensor([0.5, 0.25, 0.25]).log())) == pytest.approx(1.5 * math.log(2))


def test_kl_controller_fixed_and_adaptive() -> None:
    fixed = KLController(0.1)
    fixed.update(5.0)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=5)
    adaptive.update(24.0)  # error 3, clipped to +1
    assert adaptive.value == pytest.approx(0.1 * math.exp(1 / 5))
    adaptive.update(5.4)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * math.exp(0.2) * math.exp(-0.1 / 5))
    adaptive.update(float("nan"))  # a NaN KL leaves it alone (the trainer stops on it)
    assert adaptive.value == pytest.approx(0.1 * math.exp(0.2 - 0.02))
    for _ in range(20):  # far under the target: down to the starting value, never below
        adaptive.update(0.0)
    assert adaptive.value == pytest.approx(0.1)
    restored = KLController(1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored == adaptive


def test_kl_controller_reaches_its_target_within_tens_of_steps() -> None:
    """A toy policy whose KL relaxes towards 6 nats minus what the penalty buys back: with target 2
    the coefficient must pull KL into [1, 4] within 30 steps (the rollout horizon did nothing)."""

    def run(controller: KLController) -> list[float]:
        kl, history = 0.0, []
        for step in range(40):
            equilibrium = 8.0 / (1.0 + 20.0 * controller.value)  # more penalty, less drift (4 nats at 0.05)
            # as measured on the demo: KL stays near 0 for a dozen steps, then moves fast
            kl = 0.02 if step < 12 else kl + 0.5 * (equilibrium - kl)
            controller.update(kl)
            history.append(kl)
        return history

    history = run(KLController(0.05, target=2.0, horizon=5))
    assert 1.0 <= sum(history[-5:]) / 5 <= 4.0
    assert max(history) <= 4.0  # no overshoot: the coefficient never wound down while KL was small
    wound_down = run(KLController(0.05, target=2.0, horizon=5, floor=1e-9))
    assert max(wound_down) > 6.0  # what the floor prevents


def test_explained_variance_by_hand() -> None:
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # residuals 1-2, 2-2, 3-2 -> var 1; returns 1, 2, 3 -> var 1: no better than a constant
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    values = torch.tensor([[1.5, 2.0, 0.0], [2.5, 0.0, 0.0]])  # residuals -0.5, 0, 0.5 -> var 0.25
    assert explained_variance(values, returns, mask) == pytest.approx(0.75)


def test_eos_penalty_replace_and_subtract() -> None:
    scores, ended = torch.tensor([0.5, -0.2, 1.0]), torch.tensor([True, False, False])
    close(apply_eos_penalty(scores, ended, -1.0, "replace"), [0.5, -1.0, -1.0])
    close(apply_eos_penalty(scores, ended, -1.0, "subtract"), [0.5, -1.2, 0.0])  # TRL's rule: ranking kept
    close(apply_eos_penalty(scores, ended, 1.0, "subtract"), [0.5, -1.2, 0.0])  # either sign lowers
    close(apply_eos_penalty(scores, ended, None), [0.5, -0.2, 1.0])
    with pytest.raises(ValueError, match="replace or subtract"):
        apply_eos_penalty(scores, ended, -1.0, "clip")


# ----------------------------------------------------------------------------------------------
# Group algorithms (GRPO, RLOO)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two prompts, k = 2
    # group means 2 and 2; group stds (unbiased) sqrt(2) and 0
    close(group_advantages(rewards, 2, "none"), [-1.0, 1.0, 0.0, 0.0])
    s = math.sqrt(2.0)
    close(group_advantages(rewards, 2, "group"), [-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0])
    batch_std = math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2 + 0 + 0) / 3)  # batch mean 2
    close(group_advantages(rewards, 2, "batch"), [-1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4), 0.0, 0.0])
    with pytest.raises(ValueError, match="reward scaling"):
        group_advantages(rewards, 2, "max")


def test_leave_one_out_baseline_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5; 0 - 1.5; 0 - 1.5; 3 - 0
    close(leave_one_out_advantages(rewards, 3), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(rewards, 1)


def test_zero_variance_share_counts_flat_groups() -> None:
    assert zero_variance_share(torch.tensor([1.0, 1.0, 0.0, 2.0, 5.0, 5.0]), 2) == pytest.approx(2 / 3)


def _grpo_inputs() -> tuple[torch.Tensor, ...]:
    # two sequences: lengths 2 and 1 (max 3 tokens)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    new = torch.tensor([[math.log(1.5), 0.0, 0.0], [math.log(0.5), 0.0, 0.0]])  # ratios 1.5, 1 | 0.5
    advantages = torch.tensor([1.0, -2.0])
    return new, old, advantages, mask


def test_grpo_loss_aggregations_by_hand() -> None:
    new, old, adv, mask = _grpo_inputs()
    # per token -min(r A, clip(r, 0.8, 1.2) A): seq 0: A=1, r=1.5 -> -min(1.5, 1.2) = -1.2; r=1 -> -1
    # seq 1: A=-2, r=0.5 -> -min(-1, 0.8 * -2 = -1.6) = 1.6
    args = (new, old, None, adv, mask, 0.2, 0.2, 0.0)
    loss, stats = grpo_loss(*args, "grpo", 3)
    assert float(loss) == pytest.approx(((-1.2 - 1.0) / 2 + 1.6) / 2)
    loss, _ = grpo_loss(*args, "dapo", 3)
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 1.6) / 3)
    loss, _ = grpo_loss(*args, "dapo", 3, tokens_in_batch=6.0)  # the whole batch's token count
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 1.6) / 6)
    loss, _ = grpo_loss(*args, "dr_grpo", 3)
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 1.6) / (2 * 3))
    assert float(stats["clip_frac"]) == pytest.approx(2 / 3)  # tokens 1 and 3 use the clipped term
    with pytest.raises(ValueError, match="loss type"):
        grpo_loss(*args, "sum", 3)


def test_grpo_loss_clip_higher_and_k3_kl_by_hand() -> None:
    new, old, adv, mask = _grpo_inputs()
    # epsilon_high 0.6: seq 0 token 0 keeps r = 1.5 (-1.5 instead of -1.2)
    loss, _ = grpo_loss(new, old, None, adv, mask, 0.2, 0.6, 0.0, "dapo", 3)
    assert float(loss) == pytest.approx((-1.5 - 1.0 + 1.6) / 3)
    # k3 to the reference: ref = old (log ratio to ref = new): k3 = exp(-x) - 1 + x
    k3 = [math.exp(-math.log(1.5)) - 1 + math.log(1.5), 0.0, math.exp(-math.log(0.5)) - 1 + math.log(0.5)]
    loss, stats = grpo_loss(new, old, old, adv, mask, 0.2, 0.2, 0.1, "dapo", 3)
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 1.6 + 0.1 * sum(k3)) / 3)
    assert float(stats["kl_ref"]) == pytest.approx(sum(k3) / 3)


def test_sequence_clip_loss_by_hand() -> None:
    new, old, adv, mask = _grpo_inputs()
    # sequence ratios: exp(log 1.5 + 0) = 1.5 and 0.5; -min(1.5 * 1, 1.2 * 1) = -1.2; -min(-1, -1.6) = 1.6
    loss, stats = sequence_clip_loss(new, old, adv, mask, 0.2, 0.2)
    assert float(loss) == pytest.approx((-1.2 + 1.6) / 2)
    assert float(stats["clip_frac"]) == pytest.approx(1.0)
    # the padding position's log-prob never counts
    padded = new.clone()
    padded[0, 2] = 5.0
    assert float(sequence_clip_loss(padded, old, adv, mask, 0.2, 0.2)[0]) == pytest.approx(float(loss))

"""GRPO and RLOO end to end on tiny-random: they learn a reward they have never seen, keep KL bounded,
resume exactly, and leave run directories that `rlhf eval` takes like PPO's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.rl.grpo import GRPOConfig, run_grpo
from rlhfkit.rl.rloo import RLOOConfig, run_rloo

TOKEN_REWARD = f"{Path(__file__).parent / 'assets' / 'token_reward.py'}:favoured_share"
ALGOS = {"grpo": (GRPOConfig, run_grpo), "rloo": (RLOOConfig, run_rloo)}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def small_config(algo: str, prompts: Path, out: Path, **overrides: object):
    settings: dict = dict(
        reward=TOKEN_REWARD,
        prompts=str(prompts),
        out=str(out),
        policy="tiny-random",
        max_steps=4,
        batch_size=4,
        num_generations=4,
        mini_batch_size=8,
        max_new_tokens=6,
        trainable_layers=1,
        learning_rate=1e-3,
        missing_eos_penalty=None,
        save_every=2,
    )
    settings.update(overrides)
    return ALGOS[algo][0](**settings)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_learns_a_token_reward_with_bounded_kl(tmp_path: Path, prompts: Path, algo: str) -> None:
    run = tmp_path / "run"
    cfg = small_config(
        algo, prompts, run, max_steps=30, batch_size=8, num_generations=4, mini_batch_size=16,
        num_iterations=2, max_new_tokens=8, learning_rate=2e-3, save_every=0,
    )  # fmt: skip
    summary = ALGOS[algo][1](cfg)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["reward_mean"] for r in rows[:8]) / 8
    last = sum(r["reward_mean"] for r in rows[-8:]) / 8
    assert last > first + 0.05, (first, last)
    assert all(math.isfinite(r["kl"]) and r["kl"] < 30 for r in rows)
    assert summary["steps"] == 30
    for key in (
        "reward_mean", "reward_std", "kl", "entropy", "clip_frac", "approx_kl", "response_length", "eos_rate",
        "distinct_2", "group_reward_std", "zero_variance_groups", "updates", "time_generate", "time_score",
        "time_train", "seconds",
    ):  # fmt: skip
        assert key in rows[-1], key
    assert rows[-1]["updates"] == 2 * 32 // 16  # num_iterations x (prompts x k / mini-batch)
    for name in ("config.yaml", "README.md", "adapter/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert not (run / "value_head.safetensors").exists()  # no critic


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_resume_reproduces_a_straight_run(tmp_path: Path, prompts: Path, algo: str) -> None:
    train = ALGOS[algo][1]
    train(small_config(algo, prompts, tmp_path / "straight", max_steps=4))
    train(small_config(algo, prompts, tmp_path / "split", max_steps=2))
    train(ALGOS[algo][0](resume=str(tmp_path / "split"), max_steps=4))

    def numbers(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in read_metrics(run)]

    assert numbers(tmp_path / "split") == numbers(tmp_path / "straight")


def test_grpo_group_of_equal_scores_skips_the_update(tmp_path: Path, prompts: Path, capsys) -> None:
    """One-token answers never reach EOS: the replace-mode EOS penalty makes every group flat."""
    cfg = small_config("grpo", prompts, tmp_path / "run", max_new_tokens=1, missing_eos_penalty=-1.0, max_steps=2)
    run_grpo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert all(r["zero_variance_groups"] == 1.0 and r["policy_updated"] == 0 and r["updates"] == 0 for r in rows)
    err = capsys.readouterr().err
    assert err.count("carry no signal") == 1 and "--max-new-tokens" in err


def test_grpo_beta_zero_and_loss_types_run(tmp_path: Path, prompts: Path) -> None:
    for loss_type in ("grpo", "dr_grpo"):
        out = tmp_path / loss_type
        run_grpo(small_config("grpo", prompts, out, beta=0.0, loss_type=loss_type, scale_rewards="none", max_steps=1))
        row = read_metrics(out)[0]
        assert row["kl_ref"] == 0.0 and math.isfinite(row["loss"]) and row["updates"] == 2  # no KL term at beta 0


def test_bad_settings_are_clear_errors(tmp_path: Path, prompts: Path) -> None:
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        small_config("rloo", prompts, tmp_path / "run", num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        small_config("grpo", prompts, tmp_path / "run", loss_type="mean")
    with pytest.raises(RlhfkitError, match="only --max-steps"):
        run_grpo(GRPOConfig(resume=str(tmp_path), beta=0.5))


def test_eval_takes_a_grpo_run(tmp_path: Path, prompts: Path) -> None:
    from rlhfkit.evaluation import evaluate
    from rlhfkit.generation import SamplingParams

    run_grpo(small_config("grpo", prompts, tmp_path / "run", max_steps=1))
    metrics = evaluate(
        "tiny-random", tmp_path / "run", ["Say hi."] * 3, judges=["nontoxic"], params=SamplingParams(4, 0.7)
    )
    assert math.isfinite(metrics["tuned"]["kl_from_base"]["mean"])

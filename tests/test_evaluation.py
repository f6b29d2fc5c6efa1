"""Evaluation statistics by hand, and the demo pipeline end to end on tiny-random."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.evaluation import distinct_n, mean_ci, win_rate


def test_mean_ci_by_hand() -> None:
    stats = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2  # stdev of 1..4 is sqrt(5/3)
    assert stats["mean"] == 2.5
    assert stats["ci_low"] == pytest.approx(2.5 - half)
    assert stats["ci_high"] == pytest.approx(2.5 + half)
    assert stats["n"] == 4


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 1.0]) == pytest.approx(0.625)


def test_distinct_n() -> None:
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["", "x"], 2) == 0.0


def test_demo_runs_the_whole_loop_on_tiny_random(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny-random", "--quick", "--out", str(out), "--num-prompts", "12",
            "--held-out", "12", "--ppo-steps", "2", "--max-new-tokens", "6"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("base", "tuned"):
        for key in ("nontoxic", "toxicity", "reward", "response_length", "eos_rate", "distinct_2"):
            assert key in metrics[side], (side, key)
        assert {"mean", "ci_low", "ci_high"} <= set(metrics[side]["nontoxic"])
    assert "kl_from_base" in metrics["tuned"]
    comparison = metrics["comparison"]
    assert 0 <= comparison["nontoxic"]["win_rate"] <= 1
    # nontoxic = 1 - toxicity, and a win on toxicity is a lower one: the two win rates agree
    assert comparison["toxicity"]["win_rate"] == pytest.approx(comparison["nontoxic"]["win_rate"])
    assert (out / "SUMMARY.md").read_text().startswith("# rlhfkit demo")
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"base_completion", "tuned_completion", "base_nontoxic", "tuned_nontoxic"} <= set(
        rows[0]
    )
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "earlier demo" in again.output


def test_gains_and_losses_rank_by_the_tuned_minus_base_difference() -> None:
    from rlhfkit.evaluation import gains_and_losses

    rows = [
        {"prompt": "p1", "base_r": 0.0, "tuned_r": 0.9, "base_toxicity": 0.5, "tuned_toxicity": 0.1},
        {"prompt": "p2", "base_r": 0.5, "tuned_r": 0.6, "base_toxicity": 0.1, "tuned_toxicity": 0.4},
        {"prompt": "p3", "base_r": 0.8, "tuned_r": 0.2, "base_toxicity": 0.2, "tuned_toxicity": 0.2},
    ]
    gains, losses = gains_and_losses(rows, "tuned", "r", 5)
    assert [r["prompt"] for r in gains] == ["p1", "p2"] and [r["prompt"] for r in losses] == ["p3"]
    gains, losses = gains_and_losses(rows, "tuned", "toxicity", 1)  # lower toxicity is the gain
    assert [r["prompt"] for r in gains] == ["p1"] and [r["prompt"] for r in losses] == ["p2"]


def test_primary_metric_prefers_the_reward_model_then_a_judge() -> None:
    from rlhfkit.evaluation import primary_metric

    ci = {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 1}
    assert primary_metric({"base": {"toxicity": ci, "nontoxic": ci, "reward": ci, "response_length": ci}}) == "reward"
    assert primary_metric({"base": {"toxicity": ci, "nontoxic": ci, "response_length": ci, "eos_rate": 1.0}}) == (
        "nontoxic"
    )

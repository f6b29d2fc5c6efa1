"""Evaluation statistics by hand, and the demo pipeline end to end on tiny-random."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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
        for key in ("nontoxic", "toxicity", "reward", "response_length", "eos_rate", "distinct_2", "deflection_rate",
                    "fluency_ppl", "fluency_scorer"):  # fmt: skip
            assert key in metrics[side], (side, key)
        assert {"mean", "ci_low", "ci_high"} <= set(metrics[side]["nontoxic"])
    assert "kl_from_base" in metrics["tuned"]
    comparison = metrics["comparison"]
    assert 0 <= comparison["nontoxic"]["win_rate"] <= 1
    # nontoxic = 1 - toxicity, and a win on toxicity is a lower one: the two win rates agree
    assert comparison["toxicity"]["win_rate"] == pytest.approx(comparison["nontoxic"]["win_rate"])
    assert metrics["verdict"]["color"] in ("green", "red") and len(metrics["verdict"]["bounds"]) == 5
    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("# rlhfkit demo") and f"**Verdict: {metrics['verdict']['summary']}**" in summary
    for row in ("| EOS rate |", "| distinct-2 |", "| deflection rate", "| fluency perplexity"):
        assert row in summary, row
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"base_completion", "tuned_completion", "base_nontoxic", "tuned_nontoxic"} <= set(
        rows[0]
    )

    # The same command again reuses every finished stage; other settings are refused, naming them.
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and again.output.count("finished earlier, reused") == 5, again.output
    assert _without_timings(json.loads((out / "metrics.json").read_text())) == _without_timings(metrics)
    other = CliRunner().invoke(app, [*args, "--seed", "3"], env={"COLUMNS": "200"})
    assert other.exit_code == 2 and "--seed (0 there, 3 here)" in " ".join(other.output.split())
    # --fresh deletes the earlier demo first (here the run then stops at an unknown prompt set).
    fresh = CliRunner().invoke(app, [*args, "--seed", "3", "--fresh", "--prompts", "builtin:nope"])
    assert fresh.exit_code == 2 and "builtin:nope" in fresh.output and not (out / "stages.json").exists()


def _without_timings(metrics: dict) -> dict:
    pipeline = {k: v for k, v in metrics["pipeline"].items() if k not in ("seconds", "total_seconds")}
    return {**{k: v for k, v in metrics.items() if k not in ("pipeline", "settings")}, "pipeline": pipeline}


def test_a_demo_killed_in_its_reward_stage_continues_where_it_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in the reward model's 6th step (its last checkpoint at the end of epoch 2, step 4): run
    again, generation and labels are reused, the reward model resumes, and the demo ends with the
    numbers a straight run ends with."""
    import torch

    def demo(out: Path, *extra: str) -> Any:
        args = ["demo", "--model", "tiny-random", "--quick", "--out", str(out), "--num-prompts", "12",
                "--held-out", "12", "--ppo-steps", "2", "--max-new-tokens", "6", *extra]  # fmt: skip
        return CliRunner().invoke(app, args, env={"COLUMNS": "200"})

    assert demo(tmp_path / "straight").exit_code == 0
    real_step, calls = torch.optim.AdamW.step, []

    def dies(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)  # the reward model is the first stage with an optimizer: 2 steps an epoch here
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies)
    killed = tmp_path / "killed"
    assert demo(killed).exit_code == 130  # the interrupt ends the command as Ctrl-C would
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert set(json.loads((killed / "stages.json").read_text())) == {"generate", "label"}
    assert (killed / "reward_model" / "checkpoints" / "step-000004").is_dir()
    result = demo(killed)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and result.output.count("finished earlier, reused") == 2
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert _without_timings(json.loads((killed / "metrics.json").read_text())) == _without_timings(straight)


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


def test_completion_nll_equals_the_models_own_loss_on_each_sequence() -> None:
    """Batched, padded scoring equals the model's cross-entropy on each prompt + completion alone."""
    import torch

    from rlhfkit.evaluation.fluency import completion_nll, corpus_ppl
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    prompts = ["Tell me about the sea.", "Hi", "Write one line about bread, please, in the morning."]
    completions = ["The sea is wide and blue.", "", "Bread"]
    nlls = completion_nll(model, tok, prompts, completions, batch_size=2)
    assert nlls[1].tokens == 0 and nlls[1].ppl is None  # an empty completion is skipped
    for prompt, completion, got in zip(prompts, completions, nlls, strict=True):
        if not completion:
            continue
        query = encode_prompts(tok, [prompt])[0]
        answer = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([query + answer])
        labels = torch.tensor([[-100] * len(query) + answer])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()  # mean NLL over the completion tokens
        assert got.tokens == len(answer)
        assert got.total / got.tokens == pytest.approx(loss, rel=1e-4)
        assert got.ppl == pytest.approx(math.exp(loss), rel=1e-4)
    # A scorer without a chat template reads plain text: a reply starts a new line, a continuation does not.
    from rlhfkit.evaluation.fluency import _encode_queries

    tok.chat_template = None
    reply, continuation = _encode_queries(tok, ["Hi", "Hi"], ["there", " there"])
    assert tok.decode(reply).endswith("Hi\n") and tok.decode(continuation).endswith("Hi")
    total = sum(n.total for n in nlls)
    assert corpus_ppl(nlls) == pytest.approx(math.exp(total / sum(n.tokens for n in nlls)))
    assert corpus_ppl([nlls[1]]) is None


def _ci(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": 64}


def _side(**overrides: object) -> dict:
    side = {"distinct_2": 0.8, "eos_rate": 0.5, "deflection_rate": 0.05, "fluency_ppl": 20.0}
    return side | overrides


def test_verdict_green_needs_a_significant_gain_and_every_bound() -> None:
    from rlhfkit.evaluation import VERDICT_BOUNDS, verdict

    gain = {"nontoxic": {"difference": _ci(0.1, 0.02, 0.18), "win_rate": 0.6}}
    tuned = _side(kl_from_base=_ci(1.0, 0.5, 1.5), distinct_2=0.78, fluency_ppl=22.0)
    green = verdict(_side(), tuned, gain, "nontoxic")
    assert green["green"] and green["color"] == "green" and green["broken"] == []
    assert [b["name"] for b in green["bounds"]] == list(VERDICT_BOUNDS)
    assert all(b["pass"] for b in green["bounds"]) and green["summary"].startswith("green")

    flat = {"nontoxic": {"difference": _ci(0.1, -0.02, 0.22), "win_rate": 0.6}}
    red = verdict(_side(), tuned, flat, "nontoxic")
    assert not red["green"] and red["broken"] == [] and "did not improve significantly" in red["summary"]

    # Every bound broken at once; each named, with its measured value.
    bad = _side(kl_from_base=_ci(4.0, 3.5, 4.5), distinct_2=0.5, eos_rate=0.1, deflection_rate=0.3, fluency_ppl=40.0)
    red = verdict(_side(), bad, gain, "nontoxic")
    assert red["broken"] == list(VERDICT_BOUNDS)
    values = {b["name"]: b["value"] for b in red["bounds"]}
    assert values["kl_from_base"] == 4.0 and values["distinct_2_ratio"] == pytest.approx(0.625)
    assert values["deflection_rate_increase"] == pytest.approx(0.25) and values["eos_rate_ratio"] == 0.2
    assert values["fluency_ppl_ratio"] == 2.0
    assert "KL from base" in red["summary"] and "deflection rate" in red["summary"] and "fluency" in red["summary"]


def test_verdict_flips_for_lower_is_better_and_skips_what_it_cannot_measure() -> None:
    from rlhfkit.evaluation import verdict

    fell = {"toxicity": {"difference": _ci(-0.1, -0.15, -0.05), "win_rate": 0.7}}
    base = _side(eos_rate=0.0)
    tuned = _side(eos_rate=0.0)  # no KL (greedy), base EOS rate 0: both skipped, not failed
    result = verdict(base, tuned, fell, "toxicity")
    assert result["green"], result["summary"]
    skipped = {b["name"] for b in result["bounds"] if b["pass"] is None}
    assert skipped == {"kl_from_base", "eos_rate_ratio"}
    rose = {"toxicity": {"difference": _ci(0.1, 0.05, 0.15), "win_rate": 0.3}}
    assert not verdict(base, tuned, rose, "toxicity")["green"]
    assert not verdict(base, tuned, {}, None)["green"]

"""The simulated labeler follows sigmoid((s_a - s_b) / tau), is seeded, and pairs completions as asked."""

from __future__ import annotations

import math

import pytest

from rlhfkit.data import CandidateRecord, Prompt
from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import Judge
from rlhfkit.labeling.simulated import judge_preferences, label_summary


def _score_prefix(prompts: list[str], completions: list[str]) -> list[float]:
    """Test judge: a completion "0.7 text" scores 0.7."""
    return [float(c.split()[0]) for c in completions]


JUDGE = Judge("prefix", _score_prefix)


def _record(completions: list[str], prompt: Prompt = "p", **extra: object) -> CandidateRecord:
    return CandidateRecord(prompt=prompt, completions=completions, model=None, extra=dict(extra))


def test_probability_follows_sigmoid() -> None:
    prefs = judge_preferences([_record(["1 a", "0 b"]) for _ in range(4000)], JUDGE, tau=1.0, seed=0)
    rate = sum(p.chosen == "1 a" for p in prefs) / len(prefs)
    assert abs(rate - 1 / (1 + math.exp(-1))) < 0.03


def test_tiny_tau_is_argmax() -> None:
    records = [_record(["0.51 a", "0.5 b", "0.49 c"]) for _ in range(200)]
    prefs = judge_preferences(records, JUDGE, tau=1e-9, seed=3)
    assert len(prefs) == 600
    assert all(p.extra["score_chosen"] > p.extra["score_rejected"] for p in prefs)
    assert label_summary(prefs)["agreement"] == 1.0


def test_seeded() -> None:
    records = [_record([f"{k % 3} a{k}", f"{k % 2} b{k}"]) for k in range(300)]
    first = judge_preferences(records, JUDGE, tau=1.0, seed=7)
    again = judge_preferences(records, JUDGE, tau=1.0, seed=7)
    other = judge_preferences(records, JUDGE, tau=1.0, seed=8)
    assert [p.chosen for p in first] == [p.chosen for p in again]
    assert [p.chosen for p in first] != [p.chosen for p in other]


def test_pairings() -> None:
    five = [f"{k} c{k}" for k in range(5)]
    assert len(judge_preferences([_record(five), _record(five[:4])], JUDGE, pairs="all")) == 10 + 6
    adjacent = judge_preferences([_record(five)], JUDGE, pairs="adjacent", tau=1e-9)
    assert [(p.chosen, p.rejected) for p in adjacent] == [("1 c1", "0 c0"), ("3 c3", "2 c2")]


def test_identical_completions_skipped() -> None:
    prefs = judge_preferences([_record(["1 a", "1 a ", "0 b"]), _record(["1 x", "1 x"]), _record(["1 y"])], JUDGE)
    assert len(prefs) == 1  # the copy "1 a " takes no part: it would repeat the comparison "1 a" vs "0 b"
    assert all(p.chosen.strip() != p.rejected.strip() for p in prefs)


def test_record_fields_and_single_batched_call() -> None:
    calls: list[tuple[list[str], list[str]]] = []

    def spy(prompts: list[str], completions: list[str]) -> list[float]:
        calls.append((prompts, completions))
        return _score_prefix(prompts, completions)

    chat = [{"role": "user", "content": "hello"}]
    records = [
        _record(["0.1234567 a", "0 b"], prompt=chat, source="unit"),
        CandidateRecord(prompt="p", completions=["1 c", "0 d"], model="policy-v1", extra={}),
    ]
    prefs = judge_preferences(records, Judge("spy", spy), tau=1e-9)
    assert len(calls) == 1 and calls[0][0] == ["hello", "hello", "p", "p"]
    first = prefs[0]
    assert first.prompt == chat and first.chosen == "0.1234567 a" and first.rejected == "0 b"
    assert first.extra == {
        "source": "unit",
        "labeler": "judge:spy",
        "score_chosen": 0.123457,
        "score_rejected": 0.0,
        "tau": 1e-9,
    }
    assert prefs[1].extra["model"] == "policy-v1"


def test_bad_arguments() -> None:
    for tau in (0.0, -1.0, math.nan):
        with pytest.raises(RlhfkitError, match="tau"):
            judge_preferences([_record(["1 a", "0 b"])], JUDGE, tau=tau)
    with pytest.raises(RlhfkitError, match="pairs"):
        judge_preferences([_record(["1 a", "0 b"])], JUDGE, pairs="random")


def test_summary() -> None:
    assert label_summary([]) == {
        "count": 0,
        "agreement": None,
        "mean_score_gap": None,
        "mean_abs_score_gap": None,
    }
    prefs = judge_preferences([_record(["1 a", "0 b"]) for _ in range(100)], JUDGE, tau=1.0)
    summary = label_summary(prefs)
    assert summary["count"] == 100
    assert summary["mean_score_gap"] == pytest.approx(2 * summary["agreement"] - 1)
    assert summary["mean_abs_score_gap"] == 1.0

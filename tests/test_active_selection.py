"""Active selection of pairs to label: ``|P(a > b) - 0.5|`` under a reward model, by hand from
``score_texts``, and the labeling store serving the least sure pairs first (``--select uncertain``).

The campaign-level question (does it beat random order?) is measured, not asserted:
``bench/active_labeling.py`` and docs/measurements.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import rlhfkit.reward as reward
from rlhfkit.data import CandidateRecord, write_jsonl
from rlhfkit.labeling.store import LabelStore
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.reward import (
    RewardModel,
    RewardTrainConfig,
    load_reward_model,
    new_head,
    pair_uncertainty,
    preference_uncertainty,
    read_reward_dir,
    reward_dir_uncertainty,
    score_texts,
    train_reward_model,
)

PROMPTS = ["Describe the weather.", "Say something about cats."]
TEXTS = {
    PROMPTS[0]: ["sunny and warm", "cold rain all day long", "grey", "a storm is coming tonight"],
    PROMPTS[1]: ["cats are lovely", "cats scratch furniture", "meow"],
}


@pytest.fixture(scope="module")
def tiny_reward() -> tuple[RewardModel, object]:
    """A tiny random reward model whose head is scaled up, so scores (and uncertainties) spread out."""
    trunk = load_causal_lm("tiny-random")
    head = new_head(trunk.config.hidden_size, seed=3)
    with torch.no_grad():
        head.weight.mul_(20.0)
    return RewardModel(trunk, head, pooling="mean").eval(), load_tokenizer("tiny-random")


def by_hand(model: RewardModel, tok, prompt: str, first: str, second: str, max_length: int = 256) -> float:
    r_first, r_second = score_texts(model, tok, [prompt, prompt], [first, second], max_length)
    return abs(1 / (1 + math.exp(-(r_first - r_second))) - 0.5)


def test_preference_uncertainty_by_hand() -> None:
    got = preference_uncertainty([0.0, 2.0, -1.0, 1000.0], [0.0, 1.0, 3.0, -1000.0])
    want = [0.0, 1 / (1 + math.exp(-1.0)) - 0.5, 0.5 - 1 / (1 + math.exp(4.0)), 0.5]
    assert got == pytest.approx(want, abs=1e-12)


def test_pair_uncertainty_equals_the_hand_computation(tiny_reward, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_reward
    a, b = TEXTS[PROMPTS[0]], TEXTS[PROMPTS[1]]
    pairs = [
        (PROMPTS[0], a[0], a[1]),
        (PROMPTS[0], a[1], a[2]),  # a[1] again: scored once
        (PROMPTS[1], b[0], b[1]),
        (PROMPTS[0], a[3], a[0]),
        (PROMPTS[1], b[2], b[0]),
    ]
    scored: list[int] = []
    real = reward.score_texts

    def counting(model, tokenizer, prompts, completions, *args, **kwargs):
        scored.append(len(completions))
        return real(model, tokenizer, prompts, completions, *args, **kwargs)

    monkeypatch.setattr(reward, "score_texts", counting)
    got = pair_uncertainty(model, tok, pairs, batch_size=3)
    assert scored == [7]  # seven distinct (prompt, completion) in ten slots, one call
    monkeypatch.setattr(reward, "score_texts", real)
    want = [by_hand(model, tok, *pair) for pair in pairs]
    assert got == pytest.approx(want, abs=1e-5)
    assert all(0 <= u <= 0.5 for u in got)
    assert max(got) - min(got) > 0.05  # a spread worth ordering by
    assert pair_uncertainty(model, tok, []) == []
    # the same text under another prompt is another completion
    shared = pair_uncertainty(model, tok, [(PROMPTS[0], "same words", "other"), (PROMPTS[1], "same words", "other")])
    assert shared == pytest.approx([by_hand(model, tok, p, "same words", "other") for p in PROMPTS], abs=1e-5)


def test_reward_dir_uncertainty_cuts_at_the_trained_max_length(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Item {i}: describe it.", "chosen": "kind warm gentle " * (i % 3 + 1), "rejected": "cold cruel"}
        for i in range(24)
    ]
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = RewardTrainConfig(
        data=str(tmp_path / "prefs.jsonl"),
        out=str(tmp_path / "rm"),
        model="tiny-random",
        lora_r=0,
        epochs=0,
        head_init="probe",
        pooling="mean",
        max_length=24,
    )
    train_reward_model(cfg, show_summary=False)
    assert read_reward_dir(tmp_path / "rm").max_length == 24
    pairs = [("Item 1: describe it.", "kind warm gentle " * 9, "cold cruel"), ("Item 2", "warm", "cruel cold")]
    model, tok, _ = load_reward_model(tmp_path / "rm")
    got = reward_dir_uncertainty(tmp_path / "rm", pairs)
    assert got == pytest.approx(pair_uncertainty(model, tok, pairs, max_length=24), abs=1e-6)
    assert got[0] != pytest.approx(pair_uncertainty(model, tok, pairs[:1], max_length=256)[0], abs=1e-6)


def test_store_serves_the_least_sure_pairs_first_then_the_unscored(tiny_reward, tmp_path: Path) -> None:
    model, tok = tiny_reward
    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates([CandidateRecord(p, texts, "m") for p, texts in TEXTS.items()])
    rows = store.pairs_to_score()
    assert len(rows) == 6 + 3
    scored, unscored = rows[:6], rows[6:]  # the second prompt's pairs stay unscored
    values = pair_uncertainty(model, tok, [(p, a, b) for _, p, a, b in scored])
    assert len(set(values)) == len(values)
    store.set_uncertainty({pid: u for (pid, *_), u in zip(scored, values, strict=True)})
    store.set_select("uncertain")
    who = store.labeler_for_token(store.add_labeler("ana"))
    assert who is not None
    served = []
    while (view := store.next_pair(who)) is not None:
        served.append(view.pair_id)
        store.add_label(who, view.pair_id, "a")
    by_uncertainty = [pid for _, pid in sorted(zip(values, [r[0] for r in scored], strict=True))]
    assert served[:6] == by_uncertainty
    assert sorted(served[6:]) == [r[0] for r in unscored]

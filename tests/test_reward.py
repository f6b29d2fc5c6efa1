"""Reward model: the Bradley-Terry loss by hand, pooling under padding, the cached split, learning."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.data import PreferenceRecord, write_jsonl
from rlhfkit.generation import left_pad
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.reward import (
    RewardModel,
    RewardTrainConfig,
    bradley_terry_loss,
    join_for_reward,
    load_reward_model,
    new_head,
    pairwise_accuracy,
    right_pad,
    score_texts,
    split_by_prompt,
    train_reward_model,
)

GOOD = ["wonderful", "kind", "gentle", "happy", "bright", "lovely", "calm", "friendly", "warm", "sunny"]
BAD = ["awful", "cruel", "nasty", "angry", "dark", "ugly", "bitter", "hostile", "cold", "gloomy"]


def synthetic_preferences(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Chosen texts use one word list, rejected texts a disjoint one: learnable by any reward model."""
    rng = random.Random(seed)
    rows = [
        {
            "prompt": f"Describe item {i} in a few words.",
            "chosen": " ".join(rng.choice(GOOD) for _ in range(6)),
            "rejected": " ".join(rng.choice(BAD) for _ in range(6)),
        }
        for i in range(n)
    ]
    write_jsonl(path, rows)
    return path


def test_bradley_terry_loss_by_hand() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    margin = torch.tensor([0.0, 0.5])
    expected_margin = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.5)))) / 2
    assert float(bradley_terry_loss(chosen, rejected, margin)) == pytest.approx(expected_margin, rel=1e-6)


def test_pairwise_accuracy_counts_ties_half() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 1.0])) == 0.625


def test_join_for_reward_appends_eos_and_cuts() -> None:
    assert join_for_reward([1, 2], [3, 4, 9], eos_id=9, max_length=10) == [1, 2, 3, 4, 9]
    long = join_for_reward(list(range(100, 120)), list(range(20)), eos_id=9, max_length=16)
    assert len(long) == 16 and long[-1] == 9
    assert long[:7] == list(range(113, 120))  # prompt cut from the left, to half the room


def test_split_by_prompt_keeps_prompts_apart() -> None:
    records = [PreferenceRecord(f"p{i % 7}", "a", "b") for i in range(40)]
    train, held = split_by_prompt(records, 0.3, seed=0)
    assert sorted(train + held) == list(range(40))
    assert not {records[i].prompt for i in train} & {records[i].prompt for i in held}
    assert held


@pytest.fixture(scope="module")
def tiny_reward():
    model = load_causal_lm("tiny-random")
    return RewardModel(model, new_head(model.config.hidden_size, seed=0), split=1), load_tokenizer("tiny-random")


def test_score_same_for_left_right_and_no_padding(tiny_reward) -> None:
    model, tok = tiny_reward
    rows = [tok("a longer sequence of several words")["input_ids"], tok("short")["input_ids"]]
    ids_r, mask_r = right_pad(rows, tok.pad_token_id)
    ids_l, mask_l = left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        right = model(ids_r, mask_r)
        left = model(ids_l, mask_l)
        alone = torch.cat([model(*right_pad([r], tok.pad_token_id)) for r in rows])
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)


def test_cached_lower_layers_score_the_same(tiny_reward) -> None:
    model, tok = tiny_reward
    ids, mask = right_pad([tok("one two three")["input_ids"], tok("four")["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(model.score_from_lower(model.lower(ids, mask), mask), model(ids, mask), atol=1e-5)


@pytest.mark.parametrize("cache_lower", [True, False])
def test_reward_model_learns_synthetic_preferences(tmp_path: Path, cache_lower: bool) -> None:
    data = synthetic_preferences(tmp_path / "prefs.jsonl")
    cfg = RewardTrainConfig(
        data=str(data),
        out=str(tmp_path / "rm"),
        model="tiny-random",
        trainable_layers=1,
        epochs=3,
        cache_lower=cache_lower,
    )
    metrics = train_reward_model(cfg, show_summary=False)
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_pairs"] == 20 and metrics["train_pairs"] == 180
    saved = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    for key in (
        "eval_accuracy",
        "eval_loss",
        "mean_margin",
        "score_mean",
        "score_std",
        "seconds_per_100_pairs",
    ):
        assert key in saved
    steps = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # the saved model reloads and ranks as trained
    model, tok, loaded_metrics = load_reward_model(tmp_path / "rm")
    assert loaded_metrics["score_std"] > 0
    good, bad = score_texts(model, tok, ["Describe it.", "Describe it."], [" ".join(GOOD[:6]), " ".join(BAD[:6])])
    assert good > bad


def test_full_fine_tune_learns(tmp_path: Path) -> None:
    data = synthetic_preferences(tmp_path / "prefs.jsonl", n=120)
    cfg = RewardTrainConfig(
        data=str(data), out=str(tmp_path / "rm"), model="tiny-random", full=True, epochs=2, learning_rate=1e-3
    )
    metrics = train_reward_model(cfg, show_summary=False)
    assert metrics["eval_accuracy"] >= 0.9
    assert (tmp_path / "rm" / "model" / "model.safetensors").exists()
    model, tok, _ = load_reward_model(tmp_path / "rm")
    good, bad = score_texts(model, tok, ["Describe it."] * 2, [" ".join(GOOD[:6]), " ".join(BAD[:6])])
    assert good > bad


def test_judge_agreement_uses_judge_scores_not_labels() -> None:
    from rlhfkit.reward import judge_agreement

    records = [
        PreferenceRecord("p", "a", "b", extra={"score_chosen": 0.9, "score_rejected": 0.1}),
        PreferenceRecord("p", "c", "d", extra={"score_chosen": 0.2, "score_rejected": 0.8}),  # a noisy label
        PreferenceRecord("p", "e", "f", extra={"score_chosen": 0.5, "score_rejected": 0.5}),  # judge tie: skipped
        PreferenceRecord("p", "g", "h"),  # human label: no judge scores
    ]
    chosen, rejected = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert judge_agreement(records, chosen, rejected) == 1.0
    assert judge_agreement(records[3:], chosen[3:], rejected[3:]) is None

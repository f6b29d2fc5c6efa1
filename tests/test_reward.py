"""Reward model: the Bradley-Terry loss by hand, pooling under padding, the cached split, learning."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.data import PreferenceRecord, write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import left_pad
from rlhfkit.models import (
    build_trunk,
    cache_lower,
    drop_mapped_pages,
    load_causal_lm,
    load_tokenizer,
    release_lower,
    right_pad,
)
from rlhfkit.reward import (
    RewardModel,
    RewardTrainConfig,
    bradley_terry_loss,
    join_for_reward,
    load_reward_model,
    micro_batches,
    new_head,
    pairwise_accuracy,
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


# ----------------------------------------------------------------------------------------------
# Pooling, early stopping, old directories


def test_pool_hidden_by_hand() -> None:
    from rlhfkit.reward import pool_hidden, reward_scores

    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    # row 0 right-padded (prompt 0-1, completion 2-3 with EOS at 3); row 1 left-padded with a
    # masked hole inside the completion (prompt 1, completion 2-4, position 3 masked out).
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 1]])
    start = torch.tensor([2, 2])
    last = torch.stack([hidden[0, 3], hidden[1, 4]])
    mean = torch.stack([(hidden[0, 2] + hidden[0, 3]) / 2, (hidden[1, 2] + hidden[1, 4]) / 2])
    assert torch.equal(pool_hidden(hidden, mask, start, "last"), last)
    assert torch.allclose(pool_hidden(hidden, mask, start, "mean"), mean)
    assert torch.allclose(pool_hidden(hidden, mask, start, "last+mean"), (last + mean) / 2)
    whole = torch.stack([hidden[0, :4].mean(0), hidden[1, [1, 2, 4]].mean(0)])
    assert torch.allclose(pool_hidden(hidden, mask, None, "mean"), whole)  # no start: every real token
    head = torch.nn.Linear(2, 1)
    expected = (mean @ head.weight.T + head.bias).squeeze(-1)
    assert torch.allclose(reward_scores(head, hidden, mask, start, "mean"), expected)
    with pytest.raises(ValueError):
        pool_hidden(hidden, mask, start, "max")


def test_join_with_start_marks_the_completion() -> None:
    from rlhfkit.reward import join_with_start

    assert join_with_start([1, 2], [3, 4], eos_id=9, max_length=10) == ([1, 2, 3, 4, 9], 2)
    ids, start = join_with_start(list(range(100, 120)), list(range(20)), eos_id=9, max_length=16)
    assert ids[start] == 0 and len(ids) == 16
    assert join_with_start([1, 2], [], eos_id=9, max_length=10) == ([1, 2, 9], 2)  # only the EOS


@pytest.mark.parametrize("pooling", ["mean", "last+mean"])
def test_mean_pooling_ignores_padding_and_matches_the_cached_split(tiny_reward, pooling: str) -> None:
    trunk_model, tok = tiny_reward
    model = RewardModel(trunk_model.trunk, trunk_model.head, split=1, pooling=pooling)
    rows = [tok("a longer prompt here and a completion")["input_ids"], tok("short one")["input_ids"]]
    starts = torch.tensor([3, 1])
    ids, mask = right_pad(rows, tok.pad_token_id)
    ids_l, mask_l = left_pad(rows, tok.pad_token_id)
    shift = ids_l.shape[1] - torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        right = model(ids, mask, starts)
        left = model(ids_l, mask_l, starts + shift)
        alone = torch.cat([model(*right_pad([r], tok.pad_token_id), starts[i : i + 1]) for i, r in enumerate(rows)])
        cached = model.score_from_lower(model.lower(ids, mask), mask, starts)
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
    assert torch.allclose(cached, alone, atol=1e-5)


def test_head_dropout_only_while_training(tiny_reward) -> None:
    trunk_model, tok = tiny_reward
    model = RewardModel(trunk_model.trunk, trunk_model.head, split=1, head_dropout=0.5)
    plain = RewardModel(trunk_model.trunk, trunk_model.head, split=1)
    ids, mask = right_pad([tok("one two three four")["input_ids"]] * 8, tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids, mask), plain.eval()(ids, mask))
        torch.manual_seed(0)
        noisy = model.train()(ids, mask)
    model.eval()
    assert not torch.allclose(noisy, plain(ids, mask))


def noise_preferences(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Labels that are coin flips: whatever a model learns on them is overfitting."""
    rng = random.Random(seed)
    words = GOOD + BAD
    rows = [
        {
            "prompt": f"Describe item {i // 2} in a few words.",
            "chosen": " ".join(rng.choice(words) for _ in range(6)),
            "rejected": " ".join(rng.choice(words) for _ in range(6)),
        }
        for i in range(n)
    ]
    write_jsonl(path, rows)
    return path


def test_early_stopping_keeps_the_best_epochs_weights(tmp_path: Path) -> None:
    from rlhfkit.data import load_preferences
    from rlhfkit.reward import evaluate_pairs, split_for_validation

    data = noise_preferences(tmp_path / "noise.jsonl")
    cfg = RewardTrainConfig(
        data=str(data),
        out=str(tmp_path / "rm"),
        model="tiny-random",
        trainable_layers=1,
        epochs=6,
        learning_rate=1e-2,
        eval_fraction=0.2,
        validation_fraction=0.25,
        pooling="mean",
    )
    metrics = train_reward_model(cfg, show_summary=False)
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    val = {r["epoch"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == list(range(1, 7))
    best = min(val, key=val.get)
    assert metrics["best_epoch"] == best < 6  # memorising coin flips: the validation loss rises
    assert metrics["validation_loss"] == pytest.approx(val[best])
    assert metrics["train_pairs"] + metrics["validation_pairs"] + metrics["eval_pairs"] == 160

    # the saved model is the best epoch's, not the last one's
    records = load_preferences(data)
    train_idx, _ = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    _, val_idx = split_for_validation(records, train_idx, cfg.validation_fraction, cfg.seed)
    model, tok, _ = load_reward_model(tmp_path / "rm")
    reloaded = evaluate_pairs(model, tok, [records[i] for i in val_idx])
    assert reloaded["loss"] == pytest.approx(val[best], abs=1e-4)
    assert abs(reloaded["loss"] - val[6]) > 1e-3


@pytest.mark.parametrize("die_at_step", [2, 5, 9])
def test_a_killed_reward_training_resumes_to_a_straight_runs_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, die_at_step: int
) -> None:
    """Killed in step 2 (before any checkpoint), step 5 (the last one mid-epoch, step 3) or step 9 (the
    last one at epoch 1's end, step 7), then ``--resume``: the same metrics rows, final metrics and
    head as a straight run. LP-FT, early-stopping validation and head dropout on, so every piece of
    state must come back."""
    data = noise_preferences(tmp_path / "noise.jsonl")
    settings = dict(
        data=str(data),
        model="tiny-random",
        trainable_layers=1,
        epochs=3,
        learning_rate=1e-2,
        validation_fraction=0.25,
        head_init="probe",
        head_dropout=0.1,
        pooling="mean",
        save_every=3,
    )

    def result(out: Path) -> tuple[list[dict], dict, dict]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
        metrics = json.loads((out / "metrics.json").read_text())
        timing = ("seconds", "wall_seconds", "seconds_per_100_pairs", "cache_seconds", "probe_seconds")
        metrics = {k: v for k, v in metrics.items() if not k.endswith(timing)}
        return rows, metrics, load_file(out / "head.safetensors")

    train_reward_model(RewardTrainConfig(out=str(tmp_path / "straight"), **settings), show_summary=False)
    straight = result(tmp_path / "straight")
    assert max(r["step"] for r in straight[0]) == 21  # 7 steps an epoch

    real_step, calls = torch.optim.AdamW.step, []

    def dies(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == die_at_step:
            raise KeyboardInterrupt  # inside the optimizer step: that step never lands
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(RewardTrainConfig(out=str(killed), **settings), show_summary=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumes_from = {2: 0, 5: 3, 9: 7}[die_at_step]  # every 3 steps and at an epoch's end (7 steps an epoch)
    checkpoints = [c.name for c in (killed / "checkpoints").iterdir()] if resumes_from else []
    assert max(checkpoints, default="none") == (f"step-{resumes_from:06d}" if resumes_from else "none")
    assert not (killed / "metrics.json").exists()
    train_reward_model(RewardTrainConfig(resume=str(killed)), show_summary=False)
    rows, metrics, head = result(killed)
    assert rows == straight[0]
    assert metrics == straight[1]
    assert all(torch.equal(head[k], straight[2][k]) for k in head)


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match=r"only nothing may change .*--epochs"):
        train_reward_model(RewardTrainConfig(resume=str(tmp_path), epochs=5), show_summary=False)


def test_patience_stops_the_run(tmp_path: Path) -> None:
    data = noise_preferences(tmp_path / "noise.jsonl")
    cfg = RewardTrainConfig(
        data=str(data),
        out=str(tmp_path / "rm"),
        model="tiny-random",
        trainable_layers=1,
        epochs=8,
        learning_rate=1e-2,
        validation_fraction=0.25,
        patience=1,
    )
    metrics = train_reward_model(cfg, show_summary=False)
    assert metrics["epochs"] == metrics["best_epoch"] + 1 < 8


def test_mean_pooled_directory_scores_through_reward_scores(tmp_path: Path) -> None:
    """What PPO's shared-backbone path calls (``RewardModelDir.scores`` on the final hidden states
    with the completion start) gives the scores of ``rlhf reward score``; old directories read ``last``."""
    import yaml

    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import final_hidden
    from rlhfkit.reward import read_reward_dir

    data = synthetic_preferences(tmp_path / "prefs.jsonl", n=60)
    cfg = RewardTrainConfig(
        data=str(data), out=str(tmp_path / "rm"), model="tiny-random", trainable_layers=1, epochs=1, pooling="mean"
    )
    train_reward_model(cfg, show_summary=False)
    info = read_reward_dir(tmp_path / "rm")
    assert info.pooling == "mean"
    model, tok, _ = load_reward_model(tmp_path / "rm")
    assert model.pooling == "mean"
    prompts, completions = ["Describe it.", "Describe item 3 in a few words."], ["kind calm", "awful cold dark"]
    expected = torch.tensor(score_texts(model, tok, prompts, completions))

    # PPO's layout: queries left-padded to one width, responses right-padded, then EOS
    queries = encode_prompts(tok, prompts)
    responses = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    q_ids, q_mask = left_pad(queries, tok.pad_token_id)
    r_ids, r_mask = right_pad(responses, tok.pad_token_id)
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        hidden = final_hidden(model.trunk, ids, mask)
        got = info.scores(hidden, mask, torch.full((2,), q_ids.shape[1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    config = yaml.safe_load((tmp_path / "rm" / "config.yaml").read_text())
    del config["pooling"]  # a directory written before pooling existed
    (tmp_path / "rm" / "config.yaml").write_text(yaml.safe_dump(config))
    assert read_reward_dir(tmp_path / "rm").pooling == "last"
    assert load_reward_model(tmp_path / "rm")[0].pooling == "last"


def test_config_rejects_unknown_pooling(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pooling"):
        RewardTrainConfig(data="x", out="y", pooling="max")


def test_prompt_grouped_batches_cover_every_pair_once_per_epoch() -> None:
    from rlhfkit.reward import PromptGroupedBatches

    records = [PreferenceRecord(f"p{i % 9}", "a", "b") for i in range(50)]
    fit = [i for i in range(50) if i % 5]  # 40 pairs
    batches = PromptGroupedBatches(records, fit, batch_size=16, seed=0)
    assert len(batches) == 3
    epochs = [list(batches.epoch_batches(e)) for e in range(2)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [16, 16, 8]
        flat = [i for b in epoch for i in b]
        assert sorted(flat) == fit
        prompts = [records[i].prompt for i in flat]
        runs = [p for j, p in enumerate(prompts) if j == 0 or p != prompts[j - 1]]
        assert len(runs) == len(set(prompts))  # each prompt's pairs side by side
    assert epochs[0] != epochs[1]  # a new order each epoch
    again = PromptGroupedBatches(records, fit, batch_size=16, seed=0)
    assert [list(again.epoch_batches(e)) for e in range(2)] == epochs  # seeded by (seed, epoch)
    # A resumed run's data position follows from the step alone.
    steps = again.from_step(4)
    assert [next(steps) for _ in range(3)] == [
        (1, epochs[1][1]),
        (1, epochs[1][2]),
        (2, next(again.epoch_batches(2))),
    ]
    plain = PromptGroupedBatches(records, fit, batch_size=16, seed=0, by_prompt=False)
    assert sorted(i for b in plain.epoch_batches(0) for i in b) == fit
    assert batches.smallest(3) == 8


def test_whole_group_batches_never_split_a_ranking() -> None:
    """24 rankings of K=4 (6 pairs each, 144 pairs) in batches of 16: a ranking's pairs share a batch."""
    from rlhfkit.reward import PromptGroupedBatches

    records = [PreferenceRecord(f"p{i // 6}", "a", "b", extra={"ranking_id": i // 6}) for i in range(144)]
    fit = list(range(144))
    batches = PromptGroupedBatches(records, fit, batch_size=16, seed=0, whole_groups=True)
    assert len(batches) == 9
    cut = PromptGroupedBatches(records, fit, batch_size=16, seed=0)
    assert any(  # cutting every 16 pairs does split rankings
        len({records[i].prompt for i in b} & {records[i].prompt for i in c})
        for b, c in itertools.pairwise(list(cut.epoch_batches(0)))
    )
    for epoch in range(3):
        epoch_batches = list(batches.epoch_batches(epoch))
        assert len(epoch_batches) == 9 and sorted(i for b in epoch_batches for i in b) == fit
        owner = {}
        for n, batch in enumerate(epoch_batches):
            for i in batch:
                assert owner.setdefault(records[i].prompt, n) == n  # every ranking in one batch
        assert all(12 <= len(b) <= 24 for b in epoch_batches)  # near 16: cut at the nearest ranking end
    assert list(batches.epoch_batches(1, skip=4)) == list(batches.epoch_batches(1))[4:]
    assert batches.smallest(3) == min(len(b) for e in range(3) for b in batches.epoch_batches(e))
    # A prompt with more pairs than a batch holds is split, and every batch keeps at least one pair.
    big = [PreferenceRecord("one prompt", "a", "b") for _ in range(40)]
    split = list(PromptGroupedBatches(big, list(range(40)), batch_size=16, seed=0, whole_groups=True).epoch_batches(0))
    assert [len(b) for b in split] == [16, 16, 8]


def test_fit_linear_probe_solves_the_regularised_objective() -> None:
    from rlhfkit.reward import fit_linear_probe

    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(512, 3, generator=gen), torch.randn(512, 3, generator=gen)
    chosen[:, 0] += 2.0  # the first feature tells chosen from rejected
    w = fit_linear_probe(chosen, rejected, None, l2=0.05)
    assert w[0] > 0.5 and w[0] > 5 * w[1:].abs().max()
    v = w.clone().requires_grad_(True)
    loss = -torch.nn.functional.logsigmoid((chosen - rejected) @ v).mean() + 0.05 * v.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, v)
    assert grad.abs().max() < 1e-4  # the optimum, not a step towards it


def test_probe_initialised_head_ranks_before_training(tmp_path: Path) -> None:
    """LP-FT: with --head-init probe the head already separates the pairs; a vanishing learning rate keeps it."""
    data = synthetic_preferences(tmp_path / "prefs.jsonl", n=120)
    cfg = RewardTrainConfig(
        data=str(data),
        out=str(tmp_path / "rm"),
        model="tiny-random",
        trainable_layers=1,
        epochs=1,
        learning_rate=1e-9,
        pooling="mean",
        head_init="probe",
    )
    metrics = train_reward_model(cfg, show_summary=False)
    assert metrics["eval_accuracy"] >= 0.9 and metrics["train_accuracy"] >= 0.9
    assert metrics["probe_seconds"] > 0
    random_head = train_reward_model(
        RewardTrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "rm2"), "head_init": "random"}), show_summary=False
    )
    assert random_head["train_accuracy"] < metrics["train_accuracy"]


def test_probe_alone_with_zero_epochs(tmp_path: Path) -> None:
    data = synthetic_preferences(tmp_path / "prefs.jsonl", n=100)
    cfg = RewardTrainConfig(
        data=str(data), out=str(tmp_path / "rm"), model="tiny-random", lora_r=0, epochs=0, head_init="probe"
    )
    metrics = train_reward_model(cfg, show_summary=False)
    assert metrics["epochs"] == 0 and metrics["eval_accuracy"] >= 0.9 and metrics["eval_loss"] is not None
    model, tok, _ = load_reward_model(tmp_path / "rm")
    good, bad = score_texts(model, tok, ["Describe it."] * 2, [" ".join(GOOD[:6]), " ".join(BAD[:6])])
    assert good > bad
    with pytest.raises(ValueError, match="epochs"):
        RewardTrainConfig(data="x", out="y", epochs=0)


# ----------------------------------------------------------------------------------------------
# The lower-layer cache's storage and the release of the frozen layers (reward-model memory)


def test_lower_cache_storages_return_what_was_stored(tmp_path: Path) -> None:
    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    seqs = [tok(t)["input_ids"] for t in ("one two three four", "five", "six seven", "eight nine ten")]
    memory = cache_lower(model, 1, seqs, tok.pad_token_id, batch_size=3)
    disk = cache_lower(model, 1, seqs, tok.pad_token_id, batch_size=3, storage="disk", directory=tmp_path / "c")
    half = cache_lower(model, 1, seqs, tok.pad_token_id, batch_size=3, storage="fp16")
    dropped = cache_lower(model, 1, seqs, tok.pad_token_id, batch_size=3, drop_pages=True)
    assert drop_mapped_pages(model.model.layers[0]) > 0  # the weights are a map of the safetensors file
    again = cache_lower(model, 1, seqs, tok.pad_token_id, batch_size=3)  # read back from the file
    assert len(memory) == len(disk) == len(half) == len(seqs)
    assert list((tmp_path / "c").iterdir()) == []  # the file is unlinked from the start
    assert disk.nbytes == memory.nbytes == sum(len(s) for s in seqs) * model.config.hidden_size * 4
    assert half.nbytes == memory.nbytes // 2
    for i, seq in enumerate(seqs):
        assert memory[i].shape == (len(seq), model.config.hidden_size)
        assert torch.equal(disk[i], memory[i])  # exact
        assert torch.equal(dropped[i], memory[i]) and torch.equal(again[i], memory[i])
        assert half[i].dtype == torch.float32
        assert torch.allclose(half[i], memory[i], rtol=1e-3, atol=1e-3)  # rounded to fp16
    assert [t.shape for t in disk] == [t.shape for t in memory]
    disk.close()
    with pytest.raises(RlhfkitError, match="storage 'zip'"):
        cache_lower(model, 1, seqs, tok.pad_token_id, storage="zip")
    with pytest.raises(ValueError, match="cache_storage"):
        RewardTrainConfig(data="d", out="o", cache_storage="zip")
    with pytest.raises(ValueError, match="micro_batch"):
        RewardTrainConfig(data="d", out="o", micro_batch=1)


def test_micro_batches_keep_pairs_in_order_under_the_sequence_limit() -> None:
    refs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (6, 7), (8, 9)]
    chunks = micro_batches(range(7), refs, 4)
    assert chunks == [[0, 1, 2], [3, 4], [5, 6]]
    assert [i for c in chunks for i in c] == list(range(7))
    assert all(len({s for i in c for s in refs[i]}) <= 4 for c in chunks)
    assert micro_batches([2, 0], refs, 0) == [[2, 0]]
    assert micro_batches(range(3), refs, 2) == [[0], [1], [2]]
    # a prompt's pairs go into a chunk whole where they fit (0-2 share sequences; so do 3-4)
    groups = ["p", "p", "p", "q", "q", "r", "s"]
    assert micro_batches(range(7), refs, 5, groups) == [[0, 1, 2], [3, 4, 5], [6]]
    assert micro_batches(range(7), refs, 2, groups) == [[0], [1], [2], [3], [4], [5], [6]]


def test_released_trunk_scores_from_the_cache_as_the_whole_model_does(tmp_path: Path) -> None:
    tok = load_tokenizer("tiny-random")
    trunk, split = build_trunk(load_causal_lm("tiny-random"), False, 4, 8, 1)
    model = RewardModel(trunk, new_head(trunk.get_base_model().config.hidden_size, seed=0), split, "last+mean")
    seqs = [tok(t)["input_ids"] for t in ("a longer sequence of several words", "short", "three more words")]
    starts = torch.tensor([2, 1, 1])
    ids, mask = right_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        whole = model(ids, mask, starts)
    cache = cache_lower(trunk, split, seqs, tok.pad_token_id, storage="disk", directory=tmp_path)
    release_lower(trunk, split)
    params = sum(p.numel() for p in trunk.parameters() if not p.requires_grad)
    assert params < 0.5 * sum(p.numel() for p in load_causal_lm("tiny-random").parameters())
    lower = torch.zeros(len(seqs), ids.shape[1], trunk.get_base_model().config.hidden_size)
    for i, s in enumerate(seqs):
        lower[i, : len(s)] = cache[i]
    with torch.no_grad():
        assert torch.allclose(model(None, mask, starts, lower=lower), whole, atol=1e-6)
    with pytest.raises(RlhfkitError, match="released"):
        model(ids, mask, starts)


def test_disk_cache_released_layers_and_micro_batches_train_as_the_plain_path(tmp_path: Path) -> None:
    """The memory levers change where numbers live, not the numbers: the disk cache with the frozen
    layers released trains exactly as the in-memory cache; micro-batches add the same gradient up in
    another order (float rounding, which Adam's normalised steps magnify a little over the run)."""
    data = synthetic_preferences(tmp_path / "prefs.jsonl", n=60)
    runs = {}
    for name, storage, release, micro in (
        ("plain", "memory", False, 0),
        ("lean", "disk", True, 0),
        ("micro", "disk", True, 3),
    ):
        cfg = RewardTrainConfig(
            data=str(data),
            out=str(tmp_path / name),
            model="tiny-random",
            trainable_layers=1,
            epochs=2,
            batch_size=8,
            learning_rate=1e-2,
            pooling="last+mean",
            head_init="probe",
            cache_storage=storage,
            release_lower=release,
            micro_batch=micro,
        )
        metrics = train_reward_model(cfg, show_summary=False)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (metrics, [r["loss"] for r in rows if "loss" in r])
        assert not [p for p in (tmp_path / name).iterdir() if p.name.startswith(".lower-cache-")]
    plain, plain_losses = runs["plain"]
    assert len(plain_losses) > 4
    keys = ("eval_loss", "eval_accuracy", "score_mean", "score_std", "train_accuracy")
    for name, tolerance in (("lean", 1e-6), ("micro", 1e-3)):
        metrics, losses = runs[name]
        assert losses[0] == pytest.approx(plain_losses[0], rel=1e-6), name  # before any update
        assert losses == pytest.approx(plain_losses, rel=tolerance, abs=1e-6), name
        for key in keys:
            assert metrics[key] == pytest.approx(plain[key], rel=tolerance, abs=1e-6), (name, key)
    # the directories reload (the whole base model again) and score as trained
    texts = [" ".join(GOOD[:6]), " ".join(BAD[:6])]
    scores = {}
    for name in runs:
        model, tok, _ = load_reward_model(tmp_path / name)
        scores[name] = score_texts(model, tok, ["Describe it.", "Describe it."], texts)
    assert scores["lean"] == pytest.approx(scores["plain"], rel=1e-6, abs=1e-6)
    assert scores["micro"] == pytest.approx(scores["plain"], rel=1e-3, abs=1e-6)

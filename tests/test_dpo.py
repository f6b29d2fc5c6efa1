"""DPO: the losses against hand computations, learning on unseen pairs (tiny-random), resume, bad input,
and the run directory read by `rlhf eval` and `rlhf export`."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_yaml_config, resolve_config
from rlhfkit.data import write_jsonl as _write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import build_trunk, load_causal_lm, load_tokenizer
from rlhfkit.reward import dedupe_sequences, encode_pairs_with_starts
from rlhfkit.rl.dpo import (
    CompletionLogps,
    DPOConfig,
    PairSequences,
    completion_logps,
    dpo_loss,
    logps_falling,
    pack,
    run_dpo,
)
from rlhfkit.rundir import read_metrics

GOOD = ["sunny", "calm", "warm", "kind", "bright", "gentle", "happy", "clear"]
PLAIN = ["table", "seven", "grey", "paper", "road", "stone", "metal", "box"]
TIMING = {"seconds", "time_monitor"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a busy 2-core machine a contended thread pool makes tiny models far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def preference_rows(n_prompts: int, per_prompt: int, seed: int) -> list[dict[str, str]]:
    """Chosen completions use one word list, rejected ones another: a preference tiny-random never saw."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Question {i}: describe the day.",
            "chosen": " ".join(rng.choice(GOOD) for _ in range(4)),
            "rejected": " ".join(rng.choice(PLAIN) for _ in range(4)),
        }
        for i in range(n_prompts)
        for _ in range(per_prompt)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    _write_jsonl(path, rows)
    return path


def small_config(data: Path, out: Path, **overrides: object) -> DPOConfig:
    settings: dict = dict(
        data=str(data),
        out=str(out),
        policy="tiny-random",
        trainable_layers=1,
        max_length=64,
        batch_size=8,
        learning_rate=1e-3,
        eval_fraction=0.25,
    )
    settings.update(overrides)
    return DPOConfig(**settings)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "prefs.jsonl", preference_rows(60, 2, seed=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prefs: Path) -> tuple[Path, dict]:
    """One DPO run of 2 epochs with the KL monitor on: (run directory, metrics.json)."""
    out = tmp_path_factory.mktemp("dpo-run") / "run"
    metrics = run_dpo(small_config(prefs, out, epochs=2, monitor_prompts=str(prefs), monitor_every=6))
    return out, metrics


# ----------------------------------------------------------------------------------------------
# The math, by hand


def test_sigmoid_loss_and_implicit_rewards_by_hand() -> None:
    # Chosen: log pi - log ref = -10 - (-11) = +1; rejected: -12 - (-11) = -1; h = 2; beta h = 1.
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5
    )
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1) = 0.31326
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)  # beta * (+1), beta * (-1)
    # Two pairs: the mean. Second pair: h = 0, loss log 2, both rewards 0.
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-10.0, -3.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -3.0]),
        torch.tensor([-11.0, -4.0]),
        beta=0.5,
    )
    assert float(loss) == pytest.approx((0.31326169 + 0.69314718) / 2)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.0])


def test_label_smoothing_by_hand() -> None:
    # beta h = 1 again; -(1-e) log sig(1) - e log sig(-1) = log(1+e^-1) + e * (log(1+e) - log(1+e^-1)) and
    # log(1+e) - log(1+e^-1) = log(e) = 1, so the loss is 0.31326 + e.
    loss, _, _ = dpo_loss(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        beta=0.5,
        label_smoothing=0.1,
    )
    assert float(loss) == pytest.approx(0.31326169 + 0.1)


def test_ipo_loss_by_hand() -> None:
    # h = 2, beta = 0.5: target 1 / (2 beta) = 1, loss (2 - 1)^2 = 1. With beta = 0.25 the target is 2: loss 0.
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, chosen, rejected = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert float(loss) == pytest.approx(1.0)
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)
    assert float(dpo_loss(*args, beta=0.25, loss_type="ipo")[0]) == pytest.approx(0.0)
    # Past the target the loss rises again (IPO does not push the gap without bound): h = 4, (4 - 1)^2 = 9.
    far = dpo_loss(
        torch.tensor([-8.0]), torch.tensor([-12.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), 0.5, "ipo"
    )
    assert float(far[0]) == pytest.approx(9.0)


def test_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen, rejected = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    # d/dx -log sig(beta (c - r)) at c = r: -beta * sig(0) = -0.05 for chosen, +0.05 for rejected.
    assert float(chosen.grad) == pytest.approx(-0.05) and float(rejected.grad) == pytest.approx(0.05)


def test_falling_logps_detector() -> None:
    row = {"rewards_chosen": -0.1, "rewards_rejected": -0.3}
    assert logps_falling([row] * 5, window=5)
    assert not logps_falling([row] * 4, window=5)
    assert not logps_falling([row] * 4 + [{"rewards_chosen": 0.2, "rewards_rejected": -0.3}], window=5)
    assert logps_falling([{"step": 1}, *[row] * 3], window=3)  # rows without rewards (monitor-only) are skipped


# ----------------------------------------------------------------------------------------------
# The packed layout: cached lower layers + left/right padding score like one sequence alone


def test_packed_cached_logps_match_each_sequence_alone(prefs: Path) -> None:
    from rlhfkit.data import load_preferences

    tok = load_tokenizer("tiny-random")
    records = load_preferences(prefs)[:6]
    seqs, starts, _ = dedupe_sequences(encode_pairs_with_starts(tok, records, 64))
    records[0].prompt = "A much longer question, so that prompts differ in length: " * 2 + "what now?"
    seqs2, starts2, _ = dedupe_sequences(encode_pairs_with_starts(tok, records[:1], 64))
    seqs, starts = seqs + seqs2, starts + starts2
    torch.manual_seed(0)
    trunk, split = build_trunk(load_causal_lm("tiny-random"), False, 4, 8, 1)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for name, p in trunk.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    data = PairSequences(seqs, starts, tok.pad_token_id, split)
    data.cache_lower(trunk)
    with torch.no_grad():
        batched = data.logps(CompletionLogps(trunk, split), list(range(len(seqs))))
        alone = [float(completion_logps(trunk, 0, pack([i], seqs, starts, tok.pad_token_id))) for i in range(len(seqs))]
    assert batched.tolist() == pytest.approx(alone, rel=1e-4, abs=1e-4)
    # The completion is scored token by token: its logp is the sum over the completion and the EOS only.
    assert all(len(s) - b >= 2 for s, b in zip(seqs, starts, strict=True))


# ----------------------------------------------------------------------------------------------
# Learning, and the run directory


def test_dpo_learns_an_unseen_preference(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    assert metrics["eval_pairs"] == 30 and metrics["train_pairs"] == 90
    assert metrics["eval_accuracy"] >= 0.9, metrics
    # Held out: log pi(chosen) - log pi(rejected) rose well above the reference's.
    assert metrics["eval_logp_margin"] > metrics["eval_ref_logp_margin"] + 5, metrics
    assert metrics["eval_loss"] < math.log(2) - 0.2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, metrics["steps"] + 1))
    for key in ("loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin", "logps_chosen", "logps_rejected"):
        assert all(isinstance(r[key], float) for r in rows), key
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the adapter starts at zero: policy = reference
    assert abs(first["margin"]) < 1e-3  # implicit rewards ~0 (the reference was scored in other batches)
    assert last["margin"] > 1.0 and last["accuracy"] == 1.0
    # The KL monitor: at the first step, every 6 steps and the last.
    monitored = [r["step"] for r in rows if "monitor_kl" in r]
    assert monitored == [1, 6, 12, 18, 24]
    assert rows[-1]["monitor_kl"] > rows[0]["monitor_kl"] + 1
    assert all(r["monitor_length"] > 0 for r in rows if "monitor_kl" in r)


def test_run_directory_is_like_ppo(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "README.md", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000024"]
    saved = load_yaml_config(DPOConfig, out / "config.yaml")
    assert saved["policy"] == "tiny-random" and saved["beta"] == 0.1
    assert "DPO" in (out / "README.md").read_text()


def test_rlhf_eval_and_export_take_the_run(trained: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import rlhfkit.evaluation as evaluation
    from rlhfkit.cli import app
    from rlhfkit.serving.export import load_adapter_source

    # Fluency scored by the base itself: loading gemma3-270m (~9 s) is not what this test is about.
    score_fluency = evaluation._score_fluency
    monkeypatch.setattr(evaluation, "_score_fluency", lambda _scorer, base, *rest: score_fluency(base, base, *rest))
    out, _ = trained
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Question {i}: describe the night."} for i in range(4)])
    args = ["eval", "--base", "tiny-random", "--adapter", str(out), "--prompts", str(held),
            "--out", str(tmp_path / "e"), "--max-new-tokens", "4", "--judge", "clean"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["tuned"]["kl_from_base"]["mean"] > 0, "the tuned samples come from the DPO adapter"
    assert (tmp_path / "e" / "report.html").is_file()
    source = load_adapter_source(out, "tiny-random")  # what `rlhf serve` and `rlhf export` read
    assert source.run_dir == out and source.trained_base == "tiny-random"


def test_example_config_loads() -> None:
    example = Path(__file__).parent.parent / "examples" / "dpo.yaml"
    assert load_yaml_config(DPOConfig, example)
    resolve_config(DPOConfig, example, {})


# ----------------------------------------------------------------------------------------------
# Resume


def test_resume_after_a_kill_reproduces_a_straight_run(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(20, 2, seed=1))
    settings = dict(epochs=2, save_every=2, monitor_prompts=str(data), monitor_every=2, monitor_num_prompts=4)
    straight = run_dpo(small_config(data, tmp_path / "straight", **settings))
    assert straight["steps"] == 8

    # Stopped after 5 steps (checkpoints at 4 and 5); then "killed" after step 4's checkpoint: step 5's
    # checkpoint gone, its row left behind plus a line cut mid-write.
    killed = tmp_path / "killed"
    run_dpo(small_config(data, killed, max_steps=5, **settings))
    shutil.rmtree(killed / "checkpoints" / "step-000005")
    with (killed / "metrics.jsonl").open("a") as log:
        log.write('{"step": 6, "loss": 0.6')
    resumed = run_dpo(DPOConfig(resume=str(killed)))

    rows_a, rows_b = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for key in ("eval_accuracy", "eval_loss", "eval_margin", "eval_logp_margin", "steps"):
        assert straight[key] == pytest.approx(resumed[key], rel=1e-5, abs=1e-6), key


def test_resume_takes_only_max_steps(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="only --max-steps"):
        run_dpo(DPOConfig(resume=str(tmp_path), beta=0.5))
    with pytest.raises(RlhfkitError, match="not a run directory"):
        run_dpo(DPOConfig(resume=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# --full, IPO


def test_full_fine_tune_with_ipo_and_the_monitor(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12, 2, seed=2))
    cfg = small_config(
        data, tmp_path / "run", full=True, loss_type="ipo", learning_rate=1e-4, max_steps=2, monitor_prompts=str(data)
    )
    metrics = run_dpo(cfg)
    out = tmp_path / "run"
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and "monitor_kl" in rows[-1]
    assert rows[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)  # h = 0 at the start: (0 - 5)^2
    assert metrics["eval_pairs"] > 0 and math.isfinite(metrics["eval_loss"])
    # --resume of a --full run continues from its checkpoint (the reference comes from the base weights).
    resumed = run_dpo(DPOConfig(resume=str(out), max_steps=3))
    assert resumed["steps"] == 3 and [r["step"] for r in read_metrics(out)] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Bad input


def test_a_prompt_file_is_not_preferences(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}])
    with pytest.raises(RlhfkitError) as err:
        run_dpo(small_config(data, tmp_path / "run"))
    assert str(data) in str(err.value) and "preferences" in str(err.value)


def test_a_bad_row_names_file_and_line(tmp_path: Path) -> None:
    rows = preference_rows(3, 1, seed=0)
    rows[2]["rejected"] = 7
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(RlhfkitError, match=rf"{data}:3"):
        run_dpo(small_config(data, tmp_path / "run"))


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    base = {"data": "x.jsonl", "out": str(tmp_path / "run")}
    with pytest.raises(RlhfkitError, match="loss_type must be one of sigmoid, ipo"):
        resolve_config(DPOConfig, None, {**base, "loss_type": "hinge"})
    with pytest.raises(RlhfkitError, match="sigmoid loss only"):
        resolve_config(DPOConfig, None, {**base, "loss_type": "ipo", "label_smoothing": 0.1})
    with pytest.raises(RlhfkitError, match="beta must be > 0"):
        resolve_config(DPOConfig, None, {**base, "beta": 0})
    with pytest.raises(RlhfkitError, match="missing required option --data"):
        run_dpo(DPOConfig(out=str(tmp_path / "run")))


def test_a_new_run_refuses_an_existing_run(trained: tuple[Path, dict], prefs: Path) -> None:
    out, _ = trained
    with pytest.raises(RlhfkitError, match="--resume"):
        run_dpo(small_config(prefs, out))

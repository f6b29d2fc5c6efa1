"""PPO end to end on tiny-random: padding invariance, learning, resume and kill-and-resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.data import write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import left_pad
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.ppo.trainer import PolicyWithValue, PPOConfig, PPOTrainer, response_logprobs, run_ppo
from rlhfkit.reward import new_head, right_pad

TOKEN_REWARD = f"{Path(__file__).parent / 'assets' / 'token_reward.py'}:favoured_share"


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(path, [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    return path


def small_config(prompts: Path, out: Path, **overrides: object) -> PPOConfig:
    settings: dict = dict(
        reward=TOKEN_REWARD,
        prompts=str(prompts),
        out=str(out),
        policy="tiny-random",
        max_steps=4,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        trainable_layers=1,
        learning_rate=1e-3,
        missing_eos_penalty=None,
        save_every=2,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def test_padded_and_unpadded_sequences_get_the_same_logprobs() -> None:
    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    policy = PolicyWithValue(model, new_head(model.config.hidden_size, 0), split=0)
    queries = [tok("a fairly long prompt with many words in it")["input_ids"], tok("short")["input_ids"]]
    responses = [tok(" one two three four")["input_ids"], tok(" five")["input_ids"]]
    q_ids, q_mask = left_pad(queries, tok.pad_token_id)
    r_ids, r_mask = right_pad(responses, tok.pad_token_id)
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        batched, values, _ = policy(ids, mask, None, q_ids.shape[1], 0.7)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            one = torch.tensor([q + r])
            single, single_values, _ = policy(one, torch.ones_like(one), None, len(q), 0.7)
            assert torch.allclose(batched[i, : len(r)], single[0], atol=1e-5)
            assert torch.allclose(values[i, : len(r)], single_values[0], atol=1e-5)


def test_response_logprobs_use_the_temperature() -> None:
    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    ids = torch.tensor([tok("hello there friend")["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logp, _ = response_logprobs(model, hidden, ids, 1, temperature=0.5)
        expected = torch.log_softmax(model.lm_head(hidden[:, :-1]) / 0.5, -1).gather(-1, ids[:, 1:, None])
    assert torch.allclose(logp, expected.squeeze(-1), atol=1e-6)


def test_ppo_raises_a_token_reward_with_bounded_kl(tmp_path: Path, prompts: Path) -> None:
    cfg = small_config(
        prompts,
        tmp_path / "run",
        max_steps=40,
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        learning_rate=2e-3,
        save_every=0,
    )
    summary = run_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    assert last > first + 0.05, (first, last)
    assert all(math.isfinite(r["kl"]) and r["kl"] < 30 for r in rows)
    assert summary["steps"] == 40
    for key in (
        "step",
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "entropy",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "response_length",
        "eos_rate",
        "seconds",
    ):
        assert key in rows[-1]
    for name in ("config.yaml", "README.md", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name


def test_resume_reproduces_a_straight_run(tmp_path: Path, prompts: Path) -> None:
    run_ppo(small_config(prompts, tmp_path / "straight"))
    run_ppo(small_config(prompts, tmp_path / "resumed", max_steps=2))
    assert len(read_metrics(tmp_path / "resumed")) == 2
    run_ppo(PPOConfig(resume=str(tmp_path / "resumed"), max_steps=4))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    skip = {"seconds", "time_generate", "time_score", "time_train"}
    for a, b in zip(straight, resumed, strict=True):
        for key in a.keys() - skip:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_new_run_refuses_an_existing_run_directory(tmp_path: Path, prompts: Path) -> None:
    run_ppo(small_config(prompts, tmp_path / "run", max_steps=1))
    with pytest.raises(RlhfkitError, match="--resume"):
        run_ppo(small_config(prompts, tmp_path / "run", max_steps=1))


def test_killed_run_resumes_and_completes(tmp_path: Path, prompts: Path) -> None:
    run = tmp_path / "run"
    args = [
        "ppo",
        "--policy",
        "tiny-random",
        "--reward",
        TOKEN_REWARD,
        "--prompts",
        str(prompts),
        "--out",
        str(run),
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "6",
        "--trainable-layers",
        "1",
        "--missing-eos-penalty",
        "off",
        "--save-every",
        "1",
    ]
    cli = [sys.executable, "-c", "from rlhfkit.cli import main; main()"]
    proc = subprocess.Popen(
        [*cli, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step-000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob("step-*")), "no checkpoint before the kill"
    done = subprocess.run([*cli, "ppo", "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_bad_reward_spec_is_a_clear_error(tmp_path: Path, prompts: Path) -> None:
    with pytest.raises(RlhfkitError, match="judge:NAME"):
        run_ppo(small_config(prompts, tmp_path / "run", reward="no-such-dir"))
    with pytest.raises(RlhfkitError, match="missing required option"):
        run_ppo(PPOConfig(prompts=str(prompts)))


def test_ppo_with_a_shared_backbone_reward_model(tmp_path: Path, prompts: Path) -> None:
    """The reward model's adapter rides on the policy's base; its weights never change."""
    from rlhfkit.reward import RewardTrainConfig, train_reward_model

    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"prompt": f"p{i}", "chosen": "good kind words", "rejected": f"bad {i}"} for i in range(24)])
    train_reward_model(
        RewardTrainConfig(data=str(prefs), out=str(tmp_path / "rm"), model="tiny-random", trainable_layers=1, epochs=1),
        show_summary=False,
    )
    cfg = small_config(prompts, tmp_path / "run", reward=str(tmp_path / "rm"), max_steps=2)
    trainer = PPOTrainer(cfg)
    reward_before = {k: v.clone() for k, v in trainer.core.trunk.named_parameters() if ".reward." in k}
    assert reward_before, "the reward adapter should be loaded onto the policy's base"
    assert torch.equal(trainer.core.value_head.weight, trainer.reward.head.weight)  # value head from reward head
    trainer.train()
    for key, value in trainer.core.trunk.named_parameters():
        if key in reward_before:
            assert torch.equal(value, reward_before[key]), key
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) for r in rows)


def test_resume_takes_only_max_steps(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="only --max-steps"):
        run_ppo(PPOConfig(resume=str(tmp_path), learning_rate=0.5))

"""Data parallelism on 2 gloo processes on the CPU, each started by torchrun as a user would start it.

Kept small (tiny-random, a few steps): every launch pays for two interpreters importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.data import write_jsonl
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

ASSETS = Path(__file__).parent / "assets"
TOKEN_REWARD = f"{ASSETS / 'token_reward.py'}:favoured_share"
TIMINGS = {"seconds", "time_generate", "time_score", "time_train", "time_monitor"}


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line a user types: ``torchrun --nproc-per-node N ...`` (a free port of its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(path, [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    return path


def ppo_flags(prompts: Path, out: Path, steps: int) -> list[str]:
    return [
        "-m", "rlhfkit", "ppo", "--reward", TOKEN_REWARD, "--prompts", str(prompts), "--out", str(out),
        "--policy", "tiny-random", "--max-steps", str(steps), "--batch-size", "8", "--mini-batch-size", "4",
        "--ppo-epochs", "2", "--max-new-tokens", "6", "--trainable-layers", "1", "--learning-rate", "1e-3",
        "--missing-eos-penalty", "off", "--save-every", "2",
    ]  # fmt: skip


def test_one_ppo_update_on_two_processes_equals_one_process(tmp_path: Path, prompts: Path) -> None:
    settings = dict(
        reward=TOKEN_REWARD,
        prompts=str(prompts),
        out=str(tmp_path / "sampler"),
        policy="tiny-random",
        batch_size=8,
        mini_batch_size=8,  # one global mini-batch: 1 and 2 processes then take the same gradient steps
        ppo_epochs=2,
        max_new_tokens=6,
        trainable_layers=1,
        learning_rate=1e-3,
        missing_eos_penalty=None,
    )
    sampler = PPOTrainer(PPOConfig(**settings))
    rollout, _ = sampler.rollout(sampler.take_prompts())
    # Responses of unequal length, fewer tokens on rank 0's half: the token-mean losses must weigh
    # each rank by its share of the global batch's tokens, not 1/2 each.
    for row, length in enumerate([2, 3, 6, 5]):
        rollout.response_mask[row, length:] = 0
    batch = tmp_path / "rollout.pt"
    torch.save({f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}, batch)
    initial = {k: v.detach().clone() for k, v in sampler.core.named_parameters() if v.requires_grad}

    weights = {}
    for nproc in (1, 2):
        out = tmp_path / f"weights-{nproc}.safetensors"
        worker_settings = json.dumps({**settings, "out": str(tmp_path / f"run-{nproc}")})
        run(torchrun(nproc, str(ASSETS / "ppo_update_worker.py"), worker_settings, str(batch), str(out)))
        weights[nproc] = load_file(out)
        weights[nproc, "metrics"] = json.loads(Path(str(out) + ".json").read_text())
    assert weights[1].keys() == weights[2].keys() and len(weights[1]) > 0
    moved = max(float((weights[1][k] - initial[k]).abs().max()) for k in weights[1] if k in initial)
    assert moved > 1e-4  # the update did something to compare
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-6, msg=key)
    one, two = weights[1, "metrics"], weights[2, "metrics"]
    for key in ("policy_loss", "value_loss", "approx_kl", "kl", "reward_mean", "explained_variance", "response_length"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_two_process_ppo_killed_and_resumed_reproduces_a_straight_two_process_run(
    tmp_path: Path, prompts: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(torchrun(2, *ppo_flags(prompts, straight, 4)))
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        torchrun(2, *ppo_flags(prompts, killed, 4)), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        log = killed / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # past the step-2 checkpoint
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait()
    state = torch.load(killed / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert len(state["rank_rngs"]) == 2
    assert not torch.equal(state["rank_rngs"][0]["torch_rng"], state["rank_rngs"][1]["torch_rng"])

    run(torchrun(2, "-m", "rlhfkit", "ppo", "--resume", str(killed)))
    resumed = metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed, strict=True):
        for key in a.keys() - TIMINGS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "run"
    run(torchrun(2, *ppo_flags(prompts, out, 2)))
    done = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "ppo", "--resume", str(out), "--max-steps", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "made by 2 process(es); resume it with 2 (this run has 1)" in done.stdout + done.stderr

"""Data parallelism on 2 gloo processes on the CPU, each started by torchrun as a user would start it.

The tests that launch several runs each (kill and resume, resume with another process count, FSDP
runs) are marked slow; CI runs them with the rest of the slow suite.

Kept small (tiny-random, a few steps): every launch pays for two interpreters importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
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


def accelerate_launch(nproc: int, *args: str) -> list[str]:
    """``accelerate launch``: without a GPU it starts N processes only with ``--multi_gpu`` (they then
    join over gloo on the CPU); plain ``--num_processes N`` starts one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *args]  # fmt: skip


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ppo_flags(prompts: Path, out: Path, steps: int) -> list[str]:
    return [
        "-m", "rlhfkit", "ppo", "--reward", TOKEN_REWARD, "--prompts", str(prompts), "--out", str(out),
        "--policy", "tiny-random", "--max-steps", str(steps), "--batch-size", "8", "--mini-batch-size", "4",
        "--ppo-epochs", "2", "--max-new-tokens", "6", "--trainable-layers", "1", "--learning-rate", "1e-3",
        "--missing-eos-penalty", "off", "--save-every", "2",
    ]  # fmt: skip


def one_update(tmp_path: Path, prompts: Path, sharded: bool = False, **overrides: object) -> dict:
    """One PPO update (two epochs over one global mini-batch) from the same saved rollout batch on 1
    process and on 2 (``sharded``: FSDP2 on 2); the weights, metrics and parameter shares of each."""
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
        **overrides,
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

    weights: dict = {"initial": initial}
    for nproc in (1, 2):
        out = tmp_path / f"weights-{nproc}.safetensors"
        own = {**settings, "out": str(tmp_path / f"run-{nproc}"), "fsdp": sharded and nproc == 2}
        run(torchrun(nproc, str(ASSETS / "ppo_update_worker.py"), json.dumps(own), str(batch), str(out)))
        weights[nproc] = load_file(out)
        weights[nproc, "metrics"] = json.loads(Path(str(out) + ".json").read_text())
    return weights


def assert_same_update(weights: dict) -> None:
    initial = weights["initial"]
    assert weights[1].keys() == weights[2].keys() and len(weights[1]) > 0
    moved = max(float((weights[1][k] - initial[k]).abs().max()) for k in weights[1] if k in initial)
    assert moved > 1e-4  # the update did something to compare
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-6, msg=key)
    one, two = weights[1, "metrics"], weights[2, "metrics"]
    for key in ("policy_loss", "value_loss", "approx_kl", "kl", "reward_mean", "explained_variance", "response_length"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_one_ppo_update_on_two_processes_equals_one_process(tmp_path: Path, prompts: Path) -> None:
    weights = one_update(tmp_path, prompts)
    assert_same_update(weights)
    assert weights[2, "metrics"]["parameter_shares"] == [1.0, 1.0]  # data parallel: a whole copy each


def test_fsdp2_shards_a_full_fine_tune_and_updates_as_one_process(tmp_path: Path, prompts: Path) -> None:
    weights = one_update(tmp_path, prompts, sharded=True, full=True)
    assert_same_update(weights)
    # Every weight (policy, frozen reference, critic) is split over the 2 ranks: half each.
    assert weights[2, "metrics"]["parameter_shares"] == [pytest.approx(0.5, abs=0.01)] * 2
    assert weights[1, "metrics"]["parameter_shares"] == [1.0]


@pytest.mark.slow  # several launches: with the slow suite (CI runs both)
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


@pytest.mark.slow  # several launches: with the slow suite (CI runs both)
def test_resuming_with_another_number_of_processes_is_refused(tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "run"
    run(torchrun(2, *ppo_flags(prompts, out, 2)))
    done = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "ppo", "--resume", str(out), "--max-steps", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "made by 2 process(es); resume it with 2 (this run has 1)" in done.stdout + done.stderr


def group_flags(algo: str, prompts: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "-m", "rlhfkit", algo, "--reward", TOKEN_REWARD, "--prompts", str(prompts), "--out", str(out),
        "--policy", "tiny-random", "--max-steps", str(steps), "--batch-size", "2", "--num-generations", "4",
        "--mini-batch-size", "4", "--max-new-tokens", "6", "--learning-rate", "1e-3",
        "--missing-eos-penalty", "off", "--save-every", "1", *extra,
    ]  # fmt: skip


def test_rloo_under_accelerate_launch_writes_one_log_and_an_adapter(tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "rloo"
    done = run(accelerate_launch(2, *group_flags("rloo", prompts, out, 2)))
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "README.md").exists()
    assert done.stdout.count("reached max_steps=2") == 1  # rank 0 alone prints the summary


def test_odd_batch_over_two_processes_is_a_clear_error(tmp_path: Path, prompts: Path) -> None:
    done = subprocess.run(
        torchrun(2, *group_flags("grpo", prompts, tmp_path / "odd", 1, "--batch-size", "3")),
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "--batch-size 3 does not split over 2 processes" in done.stdout + done.stderr


@pytest.mark.slow
def test_fsdp2_grpo_run_with_monitor_resumes_like_a_straight_run(tmp_path: Path, prompts: Path) -> None:
    monitor = ("--monitor-judge", TOKEN_REWARD, "--monitor-prompts", str(prompts), "--monitor-every", "1",
               "--monitor-num-prompts", "4")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(torchrun(2, *group_flags("grpo", prompts, straight, 3, "--full", "--fsdp", *monitor)))
    run(torchrun(2, *group_flags("grpo", prompts, resumed, 2, "--full", "--fsdp", *monitor)))
    run(torchrun(2, "-m", "rlhfkit", "grpo", "--resume", str(resumed), "--max-steps", "3"))
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3] and all("monitor_score" in r for r in b)
    for x, y in zip(a, b, strict=True):
        for key in x.keys() - TIMINGS:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    final = load_file(straight / "model" / "model.safetensors")
    last = load_file(straight / "checkpoints" / "step-000003" / "trainable.safetensors")
    for key, value in last.items():  # the saved model is the whole of the last step's (gathered) weights
        torch.testing.assert_close(final[key.removeprefix("trunk.")], value)


# ----------------------------------------------------------------------------------------------
# DPO and reward-model training: each step's batch of pairs split over the ranks

PAIR_KEYS = ("loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin", "logps_chosen", "logps_rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 preference pairs on 12 prompts: batches of 5 pairs split 3 + 2 over 2 ranks, so the ranks'
    losses must be weighted by their share of the batch (an epoch's last batch is smaller still)."""
    import random

    rng = random.Random(0)
    good, plain = ["sunny", "calm", "warm", "kind", "bright", "gentle"], ["table", "seven", "grey", "paper", "road"]
    rows = [
        {
            "prompt": f"Question {i}: describe the day.",
            "chosen": " ".join(rng.choice(good) for _ in range(4)),
            "rejected": " ".join(rng.choice(plain) for _ in range(4)),
        }
        for i in range(12)
        for _ in range(2)
    ]
    path = tmp_path_factory.mktemp("pairs") / "prefs.jsonl"
    write_jsonl(path, rows)
    return path


def dpo_flags(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "-m", "rlhfkit", "dpo", "--data", str(data), "--out", str(out), "--policy", "tiny-random",
        "--trainable-layers", "1", "--max-length", "64", "--batch-size", "5", "--learning-rate", "1e-3",
        "--eval-fraction", "0.25", "--max-steps", str(steps), "--save-every", "2",
    ]  # fmt: skip


def reward_flags(data: Path, out: Path) -> list[str]:
    return [
        "-m", "rlhfkit", "reward", "train", "--data", str(data), "--out", str(out), "--model", "tiny-random",
        "--trainable-layers", "1", "--epochs", "2", "--batch-size", "5", "--learning-rate", "1e-3",
    ]  # fmt: skip


def assert_same_steps(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> None:
    """Step rows of a 1- and a 2-process run: one row per step (rank 0 alone writes), the first step's
    loss the same (the same weights: the ranks' means combine into the whole batch's), and every later
    step close (the all-reduced gradient is the whole batch's)."""
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory: pytest.TempPathFactory, pairs: Path) -> dict[int, Path]:
    """The same 4-step DPO run on 1 process and on 2."""
    root = tmp_path_factory.mktemp("dpo")
    run([sys.executable, *dpo_flags(pairs, root / "one", 4)])
    run(torchrun(2, *dpo_flags(pairs, root / "two", 4)))
    return {1: root / "one", 2: root / "two"}


def test_rank_slice_shares_an_uneven_batch_and_refuses_one_too_small() -> None:
    from rlhfkit.distributed import rank_slice
    from rlhfkit.errors import RlhfkitError

    assert [rank_slice(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [rank_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    with pytest.raises(RlhfkitError, match=r"--batch-size 8 .*: a batch of 1 does not split over 2 processes"):
        rank_slice(1, 1, 2, "--batch-size 8 (smallest batch: 1 pairs)")


def test_two_process_dpo_matches_one_process(dpo_runs: dict[int, Path]) -> None:
    one, two = metrics(dpo_runs[1]), metrics(dpo_runs[2])
    assert [r["step"] for r in one] == [1, 2, 3, 4] and [r["pairs"] for r in two] == [5, 5, 5, 3]
    assert_same_steps(one, two, PAIR_KEYS)
    held = [json.loads((dpo_runs[n] / "metrics.json").read_text()) for n in (1, 2)]
    for key in ("eval_loss", "eval_margin", "eval_logp_margin", "eval_ref_logp_margin"):
        assert held[1][key] == pytest.approx(held[0][key], rel=1e-4, abs=1e-5), key
    state = torch.load(dpo_runs[2] / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    assert len(state["rank_rngs"]) == 2
    assert (dpo_runs[2] / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # several launches: with the slow suite (CI runs both)
def test_two_process_dpo_stopped_and_resumed_reproduces_a_straight_run(
    tmp_path: Path, pairs: Path, dpo_runs: dict[int, Path]
) -> None:
    out = tmp_path / "run"
    run(torchrun(2, *dpo_flags(pairs, out, 2)))
    assert [r["step"] for r in metrics(out)] == [1, 2]
    run(torchrun(2, "-m", "rlhfkit", "dpo", "--resume", str(out), "--max-steps", "4"))
    straight, resumed = metrics(dpo_runs[2]), metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMINGS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_two_process_reward_training_matches_one_process(tmp_path: Path, pairs: Path) -> None:
    run([sys.executable, *reward_flags(pairs, tmp_path / "one")])
    done = run(accelerate_launch(2, *reward_flags(pairs, tmp_path / "two")))
    assert done.stdout.count("train_accuracy") == 1  # rank 0 alone prints the summary
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    steps_one, steps_two = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert [r["step"] for r in steps_one] == list(range(1, 11))  # 22 training pairs: 5 batches an epoch
    assert_same_steps(steps_one, steps_two, ("loss", "accuracy"))
    evals_one, evals_two = [r for r in one if "eval_loss" in r], [r for r in two if "eval_loss" in r]
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [5, 10]
    for a, b in zip(evals_one, evals_two, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4, abs=1e-5)
    final = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")]
    # Not score_mean: the head's bias cancels out of the loss, so Adam walks it on rounding noise alone.
    for key in ("eval_loss", "mean_margin", "train_accuracy", "score_std"):
        assert final[1][key] == pytest.approx(final[0][key], rel=1e-4, abs=1e-5), key
    assert (tmp_path / "two" / "head.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_ppo_sets_the_critic_bias_on_its_shards_and_saves_the_critic(tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "ppo"
    flags = ppo_flags(prompts, out, 2)
    run(torchrun(2, *flags[: flags.index("--trainable-layers")], "--full", "--fsdp", "--batch-size", "4"))
    rows = metrics(out)
    # A critic with no reward head starts at the first batch's mean score: set on the sharded bias.
    assert rows[0]["value_mean"] == pytest.approx(rows[0]["score_penalized_mean"], abs=1e-5)
    assert (out / "model" / "model.safetensors").exists() and (out / "value_head.safetensors").exists()
    assert load_file(out / "value_head.safetensors")["bias"].shape == (1,)

"""Fault injection: a training command (ppo, grpo, rloo, dpo, reward train) SIGKILLed at random
points, then continued with `--resume`, ends with the metrics of a run that was never killed
(tiny-random, a few steps each)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.data import write_jsonl

# Five commands x (a straight run + 2 kills + 2 resumes) in subprocesses: about 3.5 minutes, so with
# the slow tests (`make test-slow`, which CI runs); each trainer keeps a one-kill resume test in the
# fast suite.
pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent / "assets"
TOKEN_REWARD = f"{ASSETS / 'token_reward.py'}:favoured_share"
ONLINE = "--policy tiny-random --max-new-tokens 6 --trainable-layers 1 --learning-rate 1e-3 --save-every 2"
COMMANDS = {
    "ppo": f"ppo {ONLINE} --max-steps 8 --missing-eos-penalty off --batch-size 8 --mini-batch-size 4 --ppo-epochs 2",
    "grpo": f"grpo {ONLINE} --max-steps 8 --missing-eos-penalty off --batch-size 4 --num-generations 4",
    "rloo": f"rloo {ONLINE} --max-steps 8 --missing-eos-penalty off --batch-size 4 --num-generations 2",
    "dpo": "dpo --policy tiny-random --trainable-layers 1 --batch-size 4 --epochs 2 --learning-rate 1e-3"
    " --save-every 2",
    "reward train": "reward train --model tiny-random --trainable-layers 1 --batch-size 4 --epochs 2"
    " --learning-rate 1e-3 --save-every 2",
}
OFFLINE = ("dpo", "reward train")  # learn from the preference file, not from prompts and a reward


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    rng = random.Random(0)
    pairs = [
        {"prompt": f"Question {i}: the day?", "chosen": f"sunny {rng.random():.3f}", "rejected": f"grey {i}"}
        for i in range(8)
        for _ in range(3)
    ]
    write_jsonl(folder / "prefs.jsonl", pairs)
    return {"prompts": folder / "prompts.jsonl", "prefs": folder / "prefs.jsonl"}


def numbers(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"} for r in rows]


@pytest.mark.parametrize("algo", sorted(COMMANDS))
def test_killed_at_random_steps_then_resumed_equals_a_straight_run(
    tmp_path: Path, inputs: dict[str, Path], algo: str
) -> None:
    """SIGKILL `python -m rlhfkit ALGO` once its log holds a random number of steps (2 draws;
    checkpoints every 2 steps), then `--resume`: the metrics equal a straight run's."""
    data = ["--data", str(inputs["prefs"])]
    if algo not in OFFLINE:
        data = ["--prompts", str(inputs["prompts"]), "--reward", TOKEN_REWARD]
    command = [sys.executable, "-m", "rlhfkit", *COMMANDS[algo].split(), *data]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float sums as in-process
    straight = tmp_path / "straight"
    subprocess.run([*command, "--out", str(straight)], env=env, check=True, capture_output=True)
    steps = len(numbers(straight))
    killed_after = []
    for draw, target in enumerate(random.Random(algo).sample(range(1, steps), 2)):  # steps logged before the kill
        run = tmp_path / f"killed{draw}"
        proc = subprocess.Popen(
            [*command, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        log = run / "metrics.jsonl"
        while proc.poll() is None:
            if log.exists() and len(log.read_bytes().splitlines()) >= target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
        killed_after.append(len(log.read_bytes().splitlines()))
        resume = [sys.executable, "-m", "rlhfkit", *algo.split(), "--resume", str(run)]
        subprocess.run(resume, env=env, check=True, capture_output=True)
        assert numbers(run) == numbers(straight), (draw, killed_after)
    assert min(killed_after) >= 1, killed_after

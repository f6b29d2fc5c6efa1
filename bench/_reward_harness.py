"""Shared by `reward_levers.py` and `reward_curve.py`: `train_reward_model` on the quick demo's pairs
with chosen train/eval prompts, the frozen layers' output memoised on disk.

- The split: ``train_reward_model`` splits by prompt with its seed; here the caller names the training
  and evaluation prompts instead (the demo's own held-out prompts, or an inner fold of its training
  prompts), so the training seed can vary without moving the split. Early stopping's validation
  split (``validation_fraction``) is still drawn by the library from the training prompts.
- The memo: the frozen lower layers' output per sequence does not depend on the training settings,
  so it is computed once per split layer and kept in ``bench/.cache/reward_memo/``; each run's wall
  time is reported as if the cache pass had run (its measured cost on the whole file is added back).
- ``matmul_gflops`` (from ``_floors``): the fp32 rate of a 2048^3 matmul, printed beside every timing (hosts vary 2x).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _floors import matmul_gflops

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = ROOT / "runs" / "rmdata" / "preferences.jsonl"
MEMO = BENCH / ".cache" / "reward_memo"
# What `rlhf demo --quick` passes today (the rest are RewardTrainConfig's defaults).
DEMO = {"model": "smollm2-135m", "epochs": 3, "learning_rate": 1e-3, "eval_fraction": 0.2, "seed": 0}


def prompt_key(record) -> str:
    from rlhfkit.data import prompt_text

    return json.dumps(prompt_text(record.prompt))


class Harness:
    """Patches ``rlhfkit.reward`` (split and cache pass) for the runs of one process."""

    def __init__(self, data: Path = DATA) -> None:
        import rlhfkit.reward as reward
        from rlhfkit.data import load_preferences

        self.reward = reward
        self.data = data
        self.records = load_preferences(data)
        self.outer_train, self.outer_eval = reward.split_by_prompt(self.records, DEMO["eval_fraction"], DEMO["seed"])
        self._split_by_prompt = reward.split_by_prompt
        self._cache_lower = reward.cache_lower
        self._plan: tuple[set[str], set[str]] | None = None
        self.model = DEMO["model"]
        self.store: dict[tuple[str, int], dict[tuple[int, ...], torch.Tensor]] = {}
        self.full_cost: dict[tuple[str, int], dict] = {}
        self.memo_seconds = 0.0
        self.last_split: int | None = None
        reward.split_by_prompt = self._split
        reward.cache_lower = self._cached
        MEMO.mkdir(parents=True, exist_ok=True)

    # -- the split -------------------------------------------------------------------------------

    def prompts(self, idx: Sequence[int]) -> list[str]:
        return sorted({prompt_key(self.records[i]) for i in idx})

    def inner_fold(self, fold: int, fraction: float = 0.2) -> tuple[list[str], list[str]]:
        """Training and validation prompts drawn from the demo's training prompts only."""
        keys = self.prompts(self.outer_train)
        random.Random(100 + fold).shuffle(keys)
        n = round(len(keys) * fraction)
        return keys[n:], keys[:n]

    def _split(self, records, fraction, seed):
        if self._plan is None:
            return self._split_by_prompt(records, fraction, seed)
        train, held = self._plan
        self._plan = None
        keys = [prompt_key(r) for r in records]
        return [i for i, k in enumerate(keys) if k in train], [i for i, k in enumerate(keys) if k in held]

    # -- the memo --------------------------------------------------------------------------------

    def _load(self, split: int) -> dict[tuple[int, ...], torch.Tensor]:
        key = (self.model, split)
        if key not in self.store:
            path = MEMO / f"{self.model}-split{split}.pt"
            meta = MEMO / f"{self.model}-split{split}.json"
            self.store[key] = torch.load(path) if path.exists() else {}
            if meta.exists():
                self.full_cost[key] = json.loads(meta.read_text())
        return self.store[key]

    def _cached(self, model, split, seqs, pad_id, batch_size=32, **_storage):
        """The memo in memory whatever storage the run asks for (levers here are about accuracy, not memory)."""
        t0 = time.perf_counter()
        store = self._load(split)
        self.last_split = split
        missing = [s for s in {tuple(s) for s in seqs} if s not in store]
        if missing:
            t1 = time.perf_counter()
            rate = matmul_gflops()
            t2 = time.perf_counter()
            hidden = self._cache_lower(model, split, [list(s) for s in missing], pad_id, batch_size)
            seconds = time.perf_counter() - t2
            store.update(zip(missing, hidden, strict=True))
            torch.save(store, MEMO / f"{self.model}-split{split}.pt")
            if len(missing) == len(set(map(tuple, seqs))):  # the whole file: the real cache pass
                cost = {"seconds": seconds, "sequences": len(missing), "gflops": rate}
                self.full_cost[(self.model, split)] = cost
                (MEMO / f"{self.model}-split{split}.json").write_text(json.dumps(cost))
            t0 += t2 - t1  # the matmul probe is not part of the run
        self.memo_seconds = time.perf_counter() - t0
        return [store[tuple(s)] for s in seqs]

    # -- one run ---------------------------------------------------------------------------------

    def run(self, settings: dict, train: Sequence[str], held: Sequence[str], out: Path) -> dict:
        """``train_reward_model`` on the pairs of ``train`` prompts, evaluated on those of ``held``."""
        from rlhfkit.reward import RewardTrainConfig, train_reward_model

        self._plan = (set(train), set(held))
        cfg = RewardTrainConfig(data=str(self.data), out=str(out), **{**DEMO, **settings})
        self.model, self.last_split, self.memo_seconds = cfg.model, None, 0.0
        metrics = train_reward_model(cfg, show_summary=False)
        cost = self.full_cost.get((cfg.model, self.last_split), {}).get("seconds", 0.0)
        metrics["memo_seconds"] = round(self.memo_seconds, 2)
        metrics["stage_seconds"] = round(metrics["wall_seconds"] - self.memo_seconds + cost, 1)
        metrics["cache_pass_seconds"] = round(cost, 1)
        return metrics


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timed(fn: Callable[[], dict]) -> tuple[dict, float, float]:
    """``fn()``, with the matmul rate measured right before it."""
    rate = matmul_gflops()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, rate

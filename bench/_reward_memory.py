"""Where `rlhf reward train`'s peak memory occurs, phase by phase, on `reward_vs_trl.py`'s pairs and settings.

    GLIBC_TUNABLES=... .venv/bin/python bench/_reward_memory.py [--set KEY=VALUE ...] [--frozen-batch N]

Runs ``train_reward_model`` with the benchmark's settings (``bench/.cache/reward_vs_trl/settings.json``
and ``prepared.json``, which ``reward_vs_trl.py`` writes) in this process, one thread sampling the
RSS (``/proc/self/statm``) every 10 ms, and the phases marked by wrapping the functions of
``rlhfkit.reward`` that start them: imports, model load, the frozen-layer pass, the release of the
frozen layers, training (steps and per-epoch evaluation, then the final scoring), saving. Prints
the fp32 matmul rate, the RSS at each phase's start and its peak within the phase, ``ru_maxrss``
and the run's times, then one JSON line prefixed ``BENCH ``. ``--set`` overrides a
``RewardTrainConfig`` field (e.g. ``--set cache_storage=memory``) and ``--frozen-batch`` the frozen
pass's batch of sequences (32), so each lever can be measured alone, each run in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    """The process's RSS every ``period`` seconds; the peak and the RSS at entry of each phase."""

    def __init__(self, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.phase = "imports"
        self.order: list[str] = ["imports"]
        self.start_mb: dict[str, float] = {"imports": self.rss()}
        self.peak_mb: dict[str, float] = {"imports": self.start_mb["imports"]}
        self.stop = False

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def mark(self, phase: str) -> None:
        now = self.rss()
        self.peak_mb[self.phase] = max(self.peak_mb[self.phase], now)
        if phase not in self.start_mb:
            self.order.append(phase)
            self.start_mb[phase] = now
            self.peak_mb[phase] = now
        self.phase = phase

    def run(self) -> None:
        while not self.stop:
            now = self.rss()
            self.peak_mb[self.phase] = max(self.peak_mb[self.phase], now)
            time.sleep(self.period)


def wrap(module: object, name: str, sampler: Sampler, phase: str, after: str | None = None) -> None:
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        sampler.mark(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            if after:
                sampler.mark(after)

    setattr(module, name, wrapped)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    from _bench_common import CACHE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(CACHE / "reward_vs_trl"), help="where settings.json and prepared.json are")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a RewardTrainConfig override")
    p.add_argument("--out", default="", help="run directory (default WORK/memory-run)")
    p.add_argument("--frozen-batch", type=int, default=0, help="sequences per batch of the frozen pass (0 = 32)")
    args = p.parse_args()

    sampler = Sampler()
    sampler.start()
    from _floors import matmul_gflops

    gflops = matmul_gflops()
    import rlhfkit.reward as reward

    sampler.mark("imports done")
    work = Path(args.work)
    s = json.loads((work / "settings.json").read_text())
    prepared = json.loads((work / "prepared.json").read_text())
    overrides = dict(item.split("=", 1) for item in args.set)
    fields = {
        "data": prepared["preferences"],
        "out": args.out or str(work / "memory-run"),
        **{k: s[k] for k in ("model", "epochs", "batch_size", "learning_rate", "warmup_fraction", "weight_decay")},
        **{k: s[k] for k in ("max_grad_norm", "eval_fraction", "seed", "lora_r", "lora_alpha", "trainable_layers")},
        "max_length": s["max_length"],
        **{k: parse_value(v) for k, v in overrides.items()},
    }
    cfg = reward.RewardTrainConfig(**fields)

    if args.frozen_batch:
        plain = reward.cache_lower
        reward.cache_lower = lambda *a, **k: plain(*a, **{**k, "batch_size": args.frozen_batch})
    wrap(reward, "load_tokenizer", sampler, "model load")
    wrap(reward, "load_causal_lm", sampler, "model load", after="trunk + head")
    wrap(reward, "cache_lower", sampler, "frozen pass", after="training")
    wrap(reward, "release_lower", sampler, "release", after="training (released)")
    wrap(reward, "_save_reward_model", sampler, "save", after="end")
    t0 = time.perf_counter()
    metrics = reward.train_reward_model(cfg, show_summary=False)
    wall = time.perf_counter() - t0
    sampler.mark("end")
    sampler.stop = True
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fp32 matmul: {gflops:.0f} GFLOP/s; overrides: {overrides or 'none'}")
    print(f"{'phase':<16} {'RSS at start MB':>16} {'peak in phase MB':>17}")
    for phase in sampler.order:
        print(f"{phase:<16} {sampler.start_mb[phase]:>16.0f} {sampler.peak_mb[phase]:>17.0f}")
    rate = metrics["train_pairs"] * cfg.epochs / (metrics["cache_seconds"] + metrics["train_seconds"])
    print(
        f"ru_maxrss {maxrss:.0f} MB; wall {wall:.1f} s, frozen pass + load {metrics['cache_seconds']:.1f} s, "
        f"steps {metrics['train_seconds']:.1f} s, pairs/s {rate:.2f}; "
        f"held-out acc {metrics['eval_accuracy']:.3f}, loss {metrics['eval_loss']:.4f}, "
        f"judge acc {metrics['eval_judge_accuracy']:.3f}"
    )
    row = {
        "overrides": overrides,
        "gflops": round(gflops, 1),
        "phases": {ph: [round(sampler.start_mb[ph]), round(sampler.peak_mb[ph])] for ph in sampler.order},
        "ru_maxrss_mb": round(maxrss),
        "wall_seconds": round(wall, 1),
        "pairs_per_second": round(rate, 2),
        **{k: metrics[k] for k in ("cache_seconds", "train_seconds", "eval_accuracy", "eval_loss", "score_mean")},
    }
    print("BENCH " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Reward-model levers on the quick demo's pairs (issue 11): held-out judge accuracy and stage wall time.

    GLIBC_TUNABLES=... flock /tmp/heavy.lock .venv/bin/python bench/reward_levers.py run base mean ...
    .venv/bin/python bench/reward_levers.py table

Data: ``runs/rmdata/preferences.jsonl`` (the quick demo's 701 pairs; ``rlhf demo --quick`` writes
them). Each lever is trained

- on 3 inner folds of the demo's TRAINING prompts (80% fit, 20% inner validation): the numbers
  settings are chosen by, never touching the held-out prompts;
- on all training prompts and scored on the demo's 143 held-out pairs (seed 0, as the demo runs),
  plus seeds 1 and 2 with ``--seeds 0 1 2`` (the split stays the demo's).

Accuracy = ``eval_judge_accuracy`` (the reward model orders a pair as the nontoxic judge's own
scores do). Stage wall time = the run's wall time with the cache pass of the frozen layers counted
at its measured cost on the whole file (the pass is memoised across runs, see ``_reward_harness``).
Results are appended to ``bench/.cache/reward_levers.jsonl``; ``table`` prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _reward_harness import BENCH, DATA, DEMO, ROOT, Harness, append_result, matmul_gflops, read_results

RESULTS = BENCH / ".cache" / "reward_levers.jsonl"

# Phase 1 (run before batches were grouped by prompt) used random pair batches: "ungrouped".
UNGROUPED = {"group_by_prompt": False}
LEVERS: dict[str, tuple[str, dict]] = {
    "base": ("today's demo: last token, LoRA r16 top 4, lr 1e-3, 3 epochs, random pair batches", UNGROUPED),
    "mean": ("pooling mean (completion + EOS), random pair batches", {**UNGROUPED, "pooling": "mean"}),
    "probe-last": (
        "linear probe (no LoRA), last token, lr 1e-2, 30 epochs",
        {**UNGROUPED, "lora_r": 0, "learning_rate": 1e-2, "epochs": 30},
    ),
    "probe-mean": (
        "linear probe (no LoRA), mean pooling, lr 1e-2, 30 epochs",
        {**UNGROUPED, "lora_r": 0, "pooling": "mean", "learning_rate": 1e-2, "epochs": 30},
    ),
    # Phase 2: batches grouped by prompt (the new default), everything else as the demo unless named.
    "group": ("batches grouped by prompt (cheaper epochs), last token", {}),
    "g-mean": ("grouped, pooling mean", {"pooling": "mean"}),
    "g-last+mean": ("grouped, pooling last+mean", {"pooling": "last+mean"}),
    "g-es": (
        "grouped, last, early stopping (15% of training prompts, patience 2), up to 6 epochs",
        {"validation_fraction": 0.15, "patience": 2, "epochs": 6},
    ),
    "g-wd": ("grouped, last, weight decay 0.5", {"weight_decay": 0.5}),
    "g-L2": ("grouped, last, LoRA on the top 2 layers", {"trainable_layers": 2}),
    "g-r4": ("grouped, last, LoRA rank 4 (alpha 8)", {"lora_r": 4, "lora_alpha": 8}),
    "g-drop": ("grouped, last, dropout 0.3 on the pooled feature", {"head_dropout": 0.3}),
    "g-lr3e-4": ("grouped, last, learning rate 3e-4", {"learning_rate": 3e-4}),
    "g-ep5": ("grouped, last, 5 epochs", {"epochs": 5}),
}


def add_combo(name: str, text: str, settings: dict) -> None:
    LEVERS[name] = (text, settings)


MEAN = {"pooling": "mean"}
add_combo("g-mean+L2", "grouped, mean, LoRA top 2", {**MEAN, "trainable_layers": 2})
add_combo("g-mean+ep2", "grouped, mean, 2 epochs", {**MEAN, "epochs": 2})
add_combo("g-mean+ep5", "grouped, mean, 5 epochs", {**MEAN, "epochs": 5})
add_combo("g-mean+lr3e-4", "grouped, mean, lr 3e-4", {**MEAN, "learning_rate": 3e-4})
add_combo("g-mean+drop", "grouped, mean, dropout 0.3", {**MEAN, "head_dropout": 0.3})
add_combo("g-mean+r4", "grouped, mean, r4", {**MEAN, "lora_r": 4, "lora_alpha": 8})
add_combo("g-mean+wd", "grouped, mean, weight decay 0.5", {**MEAN, "weight_decay": 0.5})
add_combo(
    "g-mean+es",
    "grouped, mean, early stopping (15%, patience 2), up to 6 epochs",
    {**MEAN, "validation_fraction": 0.15, "patience": 2, "epochs": 6},
)

LPFT = {**MEAN, "head_init": "probe"}
add_combo("g-mean+lpft", "grouped, mean, LP-FT (head first fit as an L2 probe)", LPFT)
add_combo("g-mean+lpft+lr3e-4", "grouped, mean, LP-FT, lr 3e-4", {**LPFT, "learning_rate": 3e-4})
add_combo("g-mean+lpft+ep1", "grouped, mean, LP-FT, 1 epoch", {**LPFT, "epochs": 1})
add_combo(
    "g-mean+lpft+es",
    "grouped, mean, LP-FT, early stopping (15%, patience 1; the probe alone is epoch 0), up to 3 epochs",
    {**LPFT, "validation_fraction": 0.15, "patience": 1},
)
add_combo(
    "probe-lbfgs",
    "linear probe alone (no LoRA), mean pooling, L-BFGS with L2 0.1 (--lora-r 0 --head-init probe --epochs 0)",
    {"lora_r": 0, "pooling": "mean", "head_init": "probe", "epochs": 0},
)


def run(names: list[str], modes: list[str], seeds: list[int], folds: int) -> None:
    harness = Harness()
    done = {(r["lever"], r["mode"], r["fold"], r["seed"]) for r in read_results(RESULTS)}
    for name in names:
        settings = LEVERS[name][1]
        jobs = []
        if "inner" in modes:
            jobs += [("inner", f, 0) for f in range(folds)]
        if "heldout" in modes:
            jobs += [("heldout", -1, s) for s in seeds]
        for mode, fold, seed in jobs:
            if (name, mode, fold, seed) in done:
                continue
            if mode == "inner":
                train, held = harness.inner_fold(fold)
            else:
                train, held = harness.prompts(harness.outer_train), harness.prompts(harness.outer_eval)
            rate = matmul_gflops()
            with tempfile.TemporaryDirectory() as tmp:
                m = harness.run({**settings, "seed": seed}, train, held, Path(tmp) / "rm")
            row = {
                "lever": name,
                "mode": mode,
                "fold": fold,
                "seed": seed,
                "settings": settings,
                "judge_accuracy": m["eval_judge_accuracy"],
                "label_accuracy": m["eval_accuracy"],
                "eval_loss": m["eval_loss"],
                "train_accuracy": m["train_accuracy"],
                "train_pairs": m["train_pairs"],
                "eval_pairs": m["eval_pairs"],
                "best_epoch": m["best_epoch"],
                "epochs_run": m["epochs"],
                "train_seconds": m["train_seconds"],
                "stage_seconds": m["stage_seconds"],
                "cache_pass_seconds": m["cache_pass_seconds"],
                "gflops": round(rate, 1),
            }
            append_result(RESULTS, row)
            print(
                f"{name:12s} {mode:7s} fold {fold:2d} seed {seed}: judge acc {row['judge_accuracy']:.3f} "
                f"label acc {row['label_accuracy']:.3f} loss {row['eval_loss']:.3f} train acc "
                f"{row['train_accuracy']:.3f} | train {row['train_seconds']:.0f} s, stage {row['stage_seconds']:.0f} s "
                f"(cache pass {row['cache_pass_seconds']:.0f} s) at {rate:.0f} GFLOP/s",
                flush=True,
            )


def wall(names: list[str]) -> None:
    """The real thing: `rlhf reward train` end to end in a fresh process (no memo, the demo's own split)."""
    for name in names:
        settings = {**DEMO, **LEVERS[name][1]}
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(ROOT / ".venv" / "bin" / "rlhf"), "reward", "train", "--data", str(DATA), "--out", f"{tmp}/rm"]
            for key, value in settings.items():
                flag = key.replace("_", "-")
                if isinstance(value, bool):
                    cmd.append(f"--{flag}" if value else f"--no-{flag}")
                else:
                    cmd += [f"--{flag}", str(value)]
            before = matmul_gflops()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            after = matmul_gflops()
            m = json.loads(Path(f"{tmp}/rm/metrics.json").read_text())
        row = {
            "lever": name,
            "mode": "wall",
            "fold": -1,
            "seed": settings["seed"],
            "settings": LEVERS[name][1],
            "judge_accuracy": m["eval_judge_accuracy"],
            "label_accuracy": m["eval_accuracy"],
            "train_accuracy": m["train_accuracy"],
            "process_seconds": round(seconds, 1),
            "wall_seconds": m["wall_seconds"],
            "cache_seconds": m["cache_seconds"],
            "train_seconds": m["train_seconds"],
            "gflops": round((before + after) / 2, 1),
            "gflops_before_after": [round(before, 1), round(after, 1)],
        }
        append_result(RESULTS, row)
        print(json.dumps(row), flush=True)


def table() -> str:
    rows = read_results(RESULTS)
    names = [n for n in LEVERS if any(r["lever"] == n for r in rows)]
    lines = [
        "| lever | inner folds: judge acc (mean of 3) | inner: val loss | held-out judge acc (seed 0) "
        "| held-out seeds 0-2 | train acc | stage wall s | train s | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mean(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f}" if xs else ""

    for n in names:
        inner = [r for r in rows if r["lever"] == n and r["mode"] == "inner"]
        held = [r for r in rows if r["lever"] == n and r["mode"] == "heldout"]
        h0 = [r for r in held if r["seed"] == 0]
        timing = h0 or held or inner
        lines.append(
            f"| {n}: {LEVERS[n][0]} | {mean([r['judge_accuracy'] for r in inner])} "
            f"| {mean([r['eval_loss'] for r in inner])} "
            f"| {mean([r['judge_accuracy'] for r in h0])} "
            f"| {mean([r['judge_accuracy'] for r in held]) if len(held) > 1 else ''} "
            f"| {mean([r['train_accuracy'] for r in h0])} "
            f"| {statistics.mean(r['stage_seconds'] for r in timing):.0f} "
            f"| {statistics.mean(r['train_seconds'] for r in timing):.0f} "
            f"| {statistics.mean(r['gflops'] for r in timing):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("levers", nargs="+", choices=list(LEVERS))
    r.add_argument("--modes", nargs="+", default=["inner", "heldout"], choices=["inner", "heldout"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--folds", type=int, default=3)
    w = sub.add_parser("wall")
    w.add_argument("levers", nargs="+", choices=list(LEVERS))
    sub.add_parser("table")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.levers, args.modes, args.seeds, args.folds)
    elif args.cmd == "wall":
        wall(args.levers)
    else:
        print(table())


if __name__ == "__main__":
    main()

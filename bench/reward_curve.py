"""Learning curve of the reward model on the quick demo's pairs: held-out judge accuracy vs training pairs.

    GLIBC_TUNABLES=... flock /tmp/heavy.lock .venv/bin/python bench/reward_curve.py --levers base chosen
    .venv/bin/python bench/reward_curve.py --table

Training sets: the demo's training prompts in a seeded random order, taken whole (every pair of a
prompt) until N pairs are reached (``--sizes``, default 100 200 400 and all 558); each size is drawn
with ``--draws`` seeds (a different subset and training seed each). Evaluation: always the demo's
143 held-out pairs, ``eval_judge_accuracy``. Levers are the names of ``reward_levers.py``.
Results are appended to ``bench/.cache/reward_curve.jsonl``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from _reward_harness import BENCH, Harness, append_result, matmul_gflops, prompt_key, read_results
from reward_levers import LEVERS

RESULTS = BENCH / ".cache" / "reward_curve.jsonl"


def subset(harness: Harness, n_pairs: int, draw: int) -> list[str]:
    """Whole training prompts, in a seeded order, until ``n_pairs`` pairs are covered."""
    counts: dict[str, int] = {}
    for i in harness.outer_train:
        key = prompt_key(harness.records[i])
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    random.Random(1000 + draw).shuffle(keys)
    chosen, total = [], 0
    for key in keys:
        if total >= n_pairs:
            break
        chosen.append(key)
        total += counts[key]
    return chosen


def run(levers: list[str], sizes: list[int], draws: int) -> None:
    harness = Harness()
    done = {(r["lever"], r["size"], r["draw"]) for r in read_results(RESULTS)}
    held = harness.prompts(harness.outer_eval)
    for name in levers:
        for size in sizes:
            for draw in range(draws):
                if (name, size, draw) in done:
                    continue
                train = subset(harness, size, draw)
                rate = matmul_gflops()
                with tempfile.TemporaryDirectory() as tmp:
                    m = harness.run({**LEVERS[name][1], "seed": draw}, train, held, Path(tmp) / "rm")
                row = {
                    "lever": name,
                    "size": size,
                    "draw": draw,
                    "train_pairs": m["train_pairs"] + m["validation_pairs"],
                    "judge_accuracy": m["eval_judge_accuracy"],
                    "label_accuracy": m["eval_accuracy"],
                    "train_accuracy": m["train_accuracy"],
                    "train_seconds": m["train_seconds"],
                    "gflops": round(rate, 1),
                }
                append_result(RESULTS, row)
                print(
                    f"{name} {size} pairs (draw {draw}: {row['train_pairs']}): judge acc "
                    f"{row['judge_accuracy']:.3f}, train acc {row['train_accuracy']:.3f}, "
                    f"train {row['train_seconds']:.0f} s at {rate:.0f} GFLOP/s",
                    flush=True,
                )


def table() -> str:
    rows = read_results(RESULTS)
    levers = list(dict.fromkeys(r["lever"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    head = "| lever | " + " | ".join(f"{s} pairs" if s < 10_000 else "all pairs" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for name in levers:
        cells = []
        for s in sizes:
            accs = [r["judge_accuracy"] for r in rows if r["lever"] == name and r["size"] == s]
            if not accs:
                cells.append("")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(accs):.3f} ({min(accs):.2f}-{max(accs):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=["base"], choices=list(LEVERS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 200, 400, 10_000])
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table")
    args = parser.parse_args()
    if args.table:
        print(table())
    else:
        run(args.levers, args.sizes, args.draws)


if __name__ == "__main__":
    main()

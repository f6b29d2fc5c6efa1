"""rlhfkit's side of `reward_vs_trl.py`: ``rlhf reward train`` on the benchmark's pairs, in the project's venv.

    .venv/bin/python bench/_reward_ours_worker.py SETTINGS.json PREPARED.json OUT_DIR

Prints (each line prefixed ``BENCH ``) one JSON object per optimizer step (``step``, ``seconds``,
``loss``), one summary (training seconds = the one-off pass over the frozen layers, model load
included, plus the steps; held-out accuracy against the labels and against the judge's order) and
one with ``peak_rss_mb`` (``ru_maxrss`` of this process).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])

    from rlhfkit.reward import RewardTrainConfig, train_reward_model

    cfg = RewardTrainConfig(
        data=prepared["preferences"],
        out=str(out),
        model=s["model"],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        learning_rate=s["learning_rate"],
        warmup_fraction=s["warmup_fraction"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        eval_fraction=s["eval_fraction"],
        seed=s["seed"],
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        trainable_layers=s["trainable_layers"],
        max_length=s["max_length"],
    )
    t0 = time.perf_counter()
    metrics = train_reward_model(cfg, show_summary=False)
    wall = time.perf_counter() - t0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            print("BENCH " + json.dumps({"step": row["step"], "seconds": row["seconds"], "loss": row["loss"]}))
    summary = {
        "train_pairs": metrics["train_pairs"],
        "eval_pairs": metrics["eval_pairs"],
        "epochs": s["epochs"],
        "train_seconds": metrics["cache_seconds"] + metrics["train_seconds"],
        "cache_seconds": metrics["cache_seconds"],
        "step_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_judge_accuracy": metrics["eval_judge_accuracy"],
        "eval_loss": metrics["eval_loss"],
    }
    print("BENCH " + json.dumps({"summary": summary}), flush=True)
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()

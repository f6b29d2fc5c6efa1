"""Reward-model training side by side: rlhfkit against TRL 1.16.0's RewardTrainer, same pairs, same settings.

    .venv/bin/python bench/reward_vs_trl.py --quick   # 1 epoch a side
    .venv/bin/python bench/reward_vs_trl.py           # 3 epochs a side; writes bench/RESULTS.md

Same work on both sides: the default backbone (SmolLM2-135M-Instruct), the same preference pairs
(made offline: ``rlhf generate`` on RealToxicityPrompts prefixes, labelled by the simulated
``nontoxic`` labeler) as the same token ids (``prompt + completion + EOS``), the same held-out split
(by prompt), LoRA (rank, alpha, target modules, top layers), head initialisation, batch of pairs,
epochs, learning rate with linear warm-up and decay, gradient clipping and seed; the Bradley-Terry
loss. Each side runs in its own process (rlhfkit in the project's venv, TRL in
``bench/.venv-trl-reward``, created on first use with the same torch 2.13.0 CPU build and the same
transformers / peft / accelerate), one after the other, with the allocator tunables set.

Reported: training pairs per second (pairs x epochs over the training time: for rlhfkit the one-off
pass over the frozen layers, model load included, plus the steps; for TRL ``trainer.train()``),
peak RSS of each process, and held-out accuracy (against the labels and against the judge's order).
The last line is exactly ``reward speedup vs TRL: X.XXx, peak memory ratio: Y.YY``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (
    BENCH,
    CACHE,
    OUR_PYTHON,
    ensure_trl_venv,
    log,
    machine,
    measured_line,
    our_versions,
    run_worker,
    write_results_section,
)

TRL_VERSION = "1.16.0"

DIFFERENCES = [
    "rlhfkit runs the frozen lower layers once per unique sequence and reuses their output in every epoch "
    "(`cache_lower`, its default); TRL runs the whole model on every step. Same loss, same trainable weights.",
    "rlhfkit's memory defaults (exact): the cached states go to an unlinked temporary file read back per batch "
    "(`--cache-storage disk`); each frozen layer's weights leave memory once a batch is through it, and after the "
    "pass the frozen layers, embeddings and LM head are freed (`--release-lower`); each step's 16 pairs run through "
    "the trained layers in chunks of at most 8 sequences with their gradients summed (`--micro-batch 8`): the same "
    "step in another float summation order. TRL holds the whole model and runs each batch at once.",
    "Score head: rlhfkit's has a bias, Llama's `score` in TRL has none; a constant shift cancels in the pairwise "
    "loss. Both start from the same seeded weights.",
    "Learning-rate warm-up: the same number of steps; rlhfkit's first step uses lr/warmup, TRL's 0.",
    "Optimizer: both AdamW (eps 1e-8, no weight decay); TRL uses its Trainer's default optim (fused AdamW).",
    "Shuffling: each side's own seeded order of the training pairs.",
    "Pad token: TRL's tokenizer pads with <|endoftext|> so Llama's classification head reads the final EOS "
    "(SmolLM2 pads with EOS, which would make it read the token before); rlhfkit reads the last masked-in token.",
    "Gradient checkpointing: off on both (TRL's RewardConfig defaults it on; --trl-gradient-checkpointing).",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch a side (default 3)")
    p.add_argument("--epochs", type=int, default=0, help="passes over the training pairs (0 = 3, or 1 with --quick)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--eval-fraction", type=float, default=0.2, help="prompts held out")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--trainable-layers", type=int, default=4, help="LoRA on the top N layers (0 = all)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rm-prompts", type=int, default=128, help="prompts (the last ones of builtin:realtoxicity)")
    p.add_argument("--rm-completions", type=int, default=4, help="completions per prompt (every pair labelled)")
    p.add_argument("--rm-max-new-tokens", type=int, default=32)
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's RewardConfig default")
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both", help="run one side (development)")
    p.add_argument("--work", default=str(CACHE / "reward_vs_trl"), help="working folder (logs, runs, settings)")
    p.add_argument("--results", default="", help="markdown file to update (default bench/RESULTS.md on full runs)")
    p.add_argument("--no-results", action="store_true", help="update no markdown file (development runs)")
    args = p.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 3)
    return args


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting both workers read (rlhfkit's RewardTrainConfig field names)."""
    return {
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "warmup_fraction": args.warmup_fraction,
        "weight_decay": 0.0,
        "max_grad_norm": args.max_grad_norm,
        "eval_fraction": args.eval_fraction,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "trainable_layers": args.trainable_layers,
        "max_length": args.max_length,
        "seed": args.seed,
        "rm_prompts": args.rm_prompts,
        "rm_completions": args.rm_completions,
        "rm_max_new_tokens": args.rm_max_new_tokens,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    summary = next(r["summary"] for r in rows if "summary" in r)
    steps = [r for r in rows if "step" in r]
    pairs = summary["train_pairs"] * summary["epochs"]
    return {
        **summary,
        "steps": steps,
        "pairs_per_second": pairs / summary["train_seconds"],
        "median_step_seconds": statistics.median(r["seconds"] for r in steps) if steps else float("nan"),
        "peak_rss_mb": next(r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r),
    }


def settings_rows(s: dict[str, Any], prep: dict[str, Any], trl: dict | None) -> list[tuple[str, str, str]]:
    layers = f"top {s['trainable_layers']}" if s["trainable_layers"] else "all"
    same = [
        ("backbone", s["model"]),
        (
            "pairs",
            f"{prep['train_pairs']} train / {prep['eval_pairs']} held-out (split by prompt, {s['eval_fraction']:.0%} "
            f"of prompts): {s['rm_prompts']} RealToxicityPrompts prefixes x {s['rm_completions']} completions "
            f"({s['rm_max_new_tokens']} tokens), every pair labelled by the nontoxic judge (tau 0.05, near-ties out)",
        ),
        ("input", f"prompt (chat template) + completion + EOS, the same token ids, at most {s['max_length']}"),
        ("loss", "Bradley-Terry -log sigmoid(r_chosen - r_rejected - margin)"),
        ("LoRA", f"r={s['lora_r']}, alpha={s['lora_alpha']}, dropout 0, every linear of the {layers} layers; head"),
        ("epochs x batch", f"{s['epochs']} x {s['batch_size']} pairs"),
        ("learning rate", f"{s['learning_rate']}, linear warm-up ({s['warmup_fraction']:.0%} of steps) and decay"),
        ("grad clipping, weight decay", f"{s['max_grad_norm']}, {s['weight_decay']}"),
        ("dtype, device, seed", f"fp32, CPU, {s['seed']}"),
    ]
    rows = [(name, value, "same") for name, value in same]
    rows += [
        ("frozen lower layers", "run once, cached (on disk) for every epoch, then freed", "run on every step"),
        ("forward/backward per step", "chunks of <= 8 sequences, gradients summed", "the whole batch"),
        ("optimizer", "torch AdamW", f"{(trl or {}).get('optim', 'Trainer default')}"),
        ("gradient checkpointing", "no", "yes" if s["trl_gradient_checkpointing"] else "no (TRL's default is yes)"),
    ]
    return rows


def markdown_report(s: dict[str, Any], prep: dict, ours: dict | None, trl: dict | None, env: dict) -> str:
    lines = [measured_line(env, TRL_VERSION), ""]
    if ours and trl:
        speedup = ours["pairs_per_second"] / trl["pairs_per_second"]
        ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        lines += [f"rlhfkit / TRL: {speedup:.2f}x the training speed at {ratio:.2f}x the peak RSS.", ""]
    lines += [
        f"| | rlhfkit | TRL {TRL_VERSION} RewardTrainer |",
        "|---|---|---|",
    ]
    for key, label, fmt in (
        ("pairs_per_second", "training pairs/s", "{:.2f}"),
        ("train_seconds", "training seconds", "{:.1f}"),
        ("cache_seconds", "of which: the frozen-layer pass (model load included)", "{:.1f}"),
        ("median_step_seconds", "median s per optimizer step", "{:.2f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
        ("eval_accuracy", "held-out accuracy (labels)", "{:.3f}"),
        ("eval_judge_accuracy", "held-out accuracy (judge's order)", "{:.3f}"),
        ("eval_loss", "held-out loss", "{:.3f}"),
    ):
        lines.append(f"| {label} | {_fmt(ours, key, fmt)} | {_fmt(trl, key, fmt)} |")
    lines += ["", "Settings:", "", "| setting | rlhfkit | TRL |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in settings_rows(s, prep, trl)]
    lines += ["", "Not identical on the two sides, and why:", ""]
    lines += [f"- {d}" for d in DIFFERENCES]
    return "\n".join(lines)


def _fmt(side: dict | None, key: str, fmt: str) -> str:
    if side is None:
        return "not run"
    value = side.get(key)
    return "" if value is None else fmt.format(value)


def print_tables(s: dict[str, Any], prep: dict, ours: dict | None, trl: dict | None, env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"Reward-model training, rlhfkit vs TRL {TRL_VERSION} ({env['cores']} cores, {env['cpu']})")
    for column in ("side", "pairs/s", "train s", "peak RSS MB", "held-out acc", "judge-order acc", "held-out loss"):
        table.add_column(column, justify="right")
    for name, side in (("rlhfkit", ours), (f"TRL {TRL_VERSION}", trl)):
        table.add_row(
            name,
            _fmt(side, "pairs_per_second", "{:.2f}"),
            _fmt(side, "train_seconds", "{:.1f}"),
            _fmt(side, "peak_rss_mb", "{:.0f}"),
            _fmt(side, "eval_accuracy", "{:.3f}"),
            _fmt(side, "eval_judge_accuracy", "{:.3f}"),
            _fmt(side, "eval_loss", "{:.3f}"),
        )
    console.print(table)
    settings = Table(title="settings")
    for column in ("setting", "rlhfkit", "TRL"):
        settings.add_column(column)
    for row in settings_rows(s, prep, trl):
        settings.add_row(*row)
    console.print(settings)


def main() -> None:
    args = parse_args()
    settings = settings_from(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    started = time.perf_counter()

    trl_python = ensure_trl_venv(BENCH / ".venv-trl-reward", TRL_VERSION) if args.only != "ours" else None
    prep = run_worker(
        OUR_PYTHON, "_prepare.py", ["reward", str(work / "settings.json"), str(work)], work / "prepare.log", "prepare"
    )[-1]
    (work / "prepared.json").write_text(json.dumps(prep, indent=2) + "\n")
    log(f"{prep['train_pairs']} training pairs, {prep['eval_pairs']} held out")

    from _floors import matmul_gflops

    gflops_start = matmul_gflops()
    log(f"fp32 matmul: {gflops_start:.0f} GFLOP/s")
    ours = trl = None
    common = [str(work / "settings.json"), str(work / "prepared.json")]
    if args.only in ("both", "ours"):
        shutil.rmtree(work / "ours-run", ignore_errors=True)
        rows = run_worker(
            OUR_PYTHON, "_reward_ours_worker.py", [*common, str(work / "ours-run")], work / "ours.log", "rlhfkit"
        )
        ours = summarise(rows)
    if trl_python is not None:
        shutil.rmtree(work / "trl-run", ignore_errors=True)
        rows = run_worker(
            trl_python, "_reward_trl_worker.py", [*common, str(work / "trl-run")], work / "trl.log", "TRL"
        )
        trl = summarise(rows)

    gflops_end = matmul_gflops()
    log(f"fp32 matmul: {gflops_end:.0f} GFLOP/s")
    env = {
        **machine(),
        **our_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "gflops_start": gflops_start,
        "gflops_end": gflops_end,
        "quick": args.quick,
    }
    report = markdown_report(settings, prep, ours, trl, env)
    print_tables(settings, prep, ours, trl, env)
    (work / "report.md").write_text(report + "\n")
    log(f"total wall time {time.perf_counter() - started:.0f} s; report in {work / 'report.md'}")
    results = args.results or ("" if args.quick or args.only != "both" else str(BENCH / "RESULTS.md"))
    results = "" if args.no_results else results
    if results:
        title = f"Reward model: rlhfkit vs TRL {TRL_VERSION} (`bench/reward_vs_trl.py`)"
        write_results_section(Path(results), "reward_vs_trl", title, report)
        log(f"updated {results}")
    if ours and trl:
        speedup = ours["pairs_per_second"] / trl["pairs_per_second"]
        ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        print(f"reward speedup vs TRL: {speedup:.2f}x, peak memory ratio: {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

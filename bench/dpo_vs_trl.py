"""DPO side by side: rlhfkit's `rlhf dpo` against TRL 1.16.0's DPOTrainer, same pairs, same settings.

    .venv/bin/python bench/dpo_vs_trl.py --quick   # 64 prompts' pairs, 1 epoch a side (< 10 min)
    .venv/bin/python bench/dpo_vs_trl.py           # 128 prompts' pairs, 3 epochs a side; writes bench/RESULTS.md

Same work on both sides: the default policy (SmolLM2-135M-Instruct), the same preference pairs
(made offline and cached: ``rlhf generate`` on RealToxicityPrompts prefixes, labelled by the
simulated ``nontoxic`` labeler; a full run's is the file ``reward_vs_trl.py`` uses) as the same token ids
(formatted prompt, then completion + EOS), the same held-out split (by prompt), LoRA (rank, alpha,
target modules, top layers), the sigmoid DPO loss with the same beta, batch of pairs, epochs,
learning rate with linear warm-up and decay, gradient clipping and seed. Each side runs in its own
process (rlhfkit in the project's venv, TRL in ``bench/.venv-trl-reward``, the TRL 1.16.0 venv that
``reward_vs_trl.py`` also uses, created on first use with the same torch 2.13.0 CPU build and the
same transformers / peft / accelerate), one after the other, with the allocator tunables set.

Reported: training pairs per second (pairs x epochs over the training time: for rlhfkit everything
``rlhf dpo`` does before its first step, model load included, plus the steps; for TRL
``trainer.train()``), peak RSS of each process, and held-out implicit-reward accuracy and DPO loss
(computed the same way on both sides); the fp32 matmul rate of the CPU before and after, since hosts
vary, and the 1-minute load average as each side ends (above the core count: something else ran
beside it and its timings are inflated). The last line is exactly
``dpo speedup vs TRL: X.XXx, peak memory ratio: Y.YY`` (speedup = our pairs/s over TRL's; memory
ratio = our peak RSS / TRL's).
"""

from __future__ import annotations

import argparse
import json
import os
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
    GLIBC_TUNABLES,
    OUR_PYTHON,
    ensure_trl_venv,
    log,
    machine,
    our_versions,
    run_worker,
    write_results_section,
)
from _floors import matmul_gflops

TRL_VERSION = "1.16.0"
TRL_VENV = BENCH / ".venv-trl-reward"  # reward_vs_trl.py's venv: the same TRL version, made once

DIFFERENCES = [
    "rlhfkit runs the frozen lower layers once per unique sequence and reuses their output in every epoch, and "
    "computes the reference's log-probs once per sequence before the first step (the adapter off); TRL runs the "
    "whole policy and the whole reference (the same model with the adapter disabled) on every step "
    "(precompute_ref_log_probs off, its default: --trl-precompute-ref). Same loss, same trainable weights.",
    "Batches: rlhfkit keeps a prompt's pairs together (each unique completion runs once per step; every pair is "
    "still seen once per epoch); TRL draws pairs in its own shuffled order and runs chosen and rejected of every pair.",
    "LM head: rlhfkit projects only the completion's positions; TRL 1.16's fused head also skips the prompt's.",
    "LoRA initialisation: each side's own seeded draw (peft's default: random A, zero B), so both start at the "
    "reference.",
    "Learning-rate warm-up: the same number of steps; rlhfkit's first step uses lr/warmup, TRL's 0.",
    "Optimizer: both AdamW (eps 1e-8, no weight decay); TRL uses its Trainer's default optim (fused AdamW).",
    "Gradient checkpointing (on by default on both sides; --gradient-checkpointing off turns it off on both): "
    "rlhfkit recomputes the trained layers in backward and its LM head in slices of 64 positions; TRL uses "
    "transformers' checkpointing of every decoder layer.",
    "Timing: rlhfkit's training time includes its model load and one-off passes; TRL's is trainer.train() alone.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 prompts' pairs (default 128), 1 epoch a side (default 3)")
    p.add_argument("--epochs", type=int, default=0, help="passes over the training pairs (0 = 3, or 1 with --quick)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--eval-fraction", type=float, default=0.2, help="prompts held out")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--trainable-layers", type=int, default=4, help="LoRA on the top N layers (0 = all)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rm-prompts",
        type=int,
        default=0,
        help="prompts, the last of builtin:realtoxicity (0 = 128, or 64 with --quick)",
    )
    p.add_argument("--rm-completions", type=int, default=4, help="completions per prompt (every pair labelled)")
    p.add_argument("--rm-max-new-tokens", type=int, default=32)
    p.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="on both sides (on: both libraries' default; off: faster, more memory)",
    )
    p.add_argument("--trl-precompute-ref", action="store_true", help="TRL's precompute_ref_log_probs=True")
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both", help="run one side (development)")
    p.add_argument("--work", default=str(CACHE / "dpo_vs_trl"), help="working folder (logs, runs, settings)")
    p.add_argument("--results", default="", help="markdown file to update (default bench/RESULTS.md on full runs)")
    p.add_argument("--no-results", action="store_true", help="update no markdown file (development runs)")
    args = p.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.rm_prompts = args.rm_prompts or (64 if args.quick else 128)
    return args


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting both workers read (rlhfkit's DPOConfig field names)."""
    return {
        "model": args.model,
        "beta": args.beta,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "warmup_fraction": args.warmup_fraction,
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
        "gradient_checkpointing": args.gradient_checkpointing == "on",
        "trl_precompute_ref": args.trl_precompute_ref,
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
        ("policy", s["model"]),
        (
            "pairs",
            f"{prep['train_pairs']} train / {prep['eval_pairs']} held-out (split by prompt, {s['eval_fraction']:.0%} "
            f"of prompts): {s['rm_prompts']} RealToxicityPrompts prefixes x {s['rm_completions']} completions "
            f"({s['rm_max_new_tokens']} tokens), every pair labelled by the nontoxic judge (tau 0.05, near-ties out)",
        ),
        ("input", f"prompt (chat template), then completion + EOS: the same token ids, at most {s['max_length']}"),
        ("loss", f"sigmoid DPO, beta {s['beta']}, no label smoothing; log-probs summed over completion + EOS"),
        ("LoRA", f"r={s['lora_r']}, alpha={s['lora_alpha']}, dropout 0, every linear of the {layers} layers"),
        ("epochs x batch", f"{s['epochs']} x {s['batch_size']} pairs"),
        ("learning rate", f"{s['learning_rate']}, linear warm-up ({s['warmup_fraction']:.0%} of steps) and decay"),
        ("grad clipping, weight decay", f"{s['max_grad_norm']}, 0.0"),
        ("dtype, device, seed", f"fp32, CPU, {s['seed']}"),
    ]
    rows = [(name, value, "same") for name, value in same]
    rows += [
        ("reference", "adapter off; log-probs once per sequence, cached", "adapter off; run on every step"
         + (" (precomputed)" if s["trl_precompute_ref"] else "")),
        ("frozen lower layers", "run once per unique sequence, cached for every epoch", "run on every step"),
        ("batches", "a prompt's pairs together, each unique completion once", "shuffled pairs"),
        ("optimizer", "torch AdamW", f"{(trl or {}).get('optim', 'Trainer default')}"),
        ("gradient checkpointing", "yes (the default)" if s["gradient_checkpointing"] else "no", "same"),
    ]  # fmt: skip
    return rows


def _fmt(side: dict | None, key: str, fmt: str) -> str:
    if side is None:
        return "not run"
    value = side.get(key)
    return "" if value is None else fmt.format(value)


def markdown_report(s: dict[str, Any], prep: dict, ours: dict | None, trl: dict | None, env: dict) -> str:
    lines = [
        f"Measured {env['date']} on {env['cores']} cores ({env['cpu']}; {env['isa']}; {env['memory']} RAM), "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"accelerate {env['accelerate']}, TRL {TRL_VERSION}; `GLIBC_TUNABLES={GLIBC_TUNABLES}` for both runs; "
        f"each side in its own process, one after the other{' (`--quick`)' if env['quick'] else ''}. "
        f"fp32 matmul (2048^3, best of 5): {env['gflops_start']:.0f} GFLOP/s before, "
        f"{env['gflops_end']:.0f} GFLOP/s after; 1-minute load average as each side ended: "
        f"rlhfkit {env['load'].get('ours', float('nan')):.2f}, TRL {env['load'].get('trl', float('nan')):.2f}.",
        "",
        f"| | rlhfkit `rlhf dpo` | TRL {TRL_VERSION} DPOTrainer |",
        "|---|---|---|",
    ]
    for key, label, fmt in (
        ("pairs_per_second", "training pairs/s", "{:.2f}"),
        ("train_seconds", "training seconds", "{:.1f}"),
        ("setup_seconds", "of which: model load, frozen-layer pass, reference log-probs", "{:.1f}"),
        ("median_step_seconds", "median s per optimizer step", "{:.2f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
        ("eval_accuracy", "held-out implicit-reward accuracy", "{:.3f}"),
        ("eval_loss", "held-out DPO loss", "{:.3f}"),
        ("eval_margin", "held-out reward margin (chosen - rejected)", "{:.3f}"),
    ):
        lines.append(f"| {label} | {_fmt(ours, key, fmt)} | {_fmt(trl, key, fmt)} |")
    lines += ["", "Settings:", "", "| setting | rlhfkit | TRL |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in settings_rows(s, prep, trl)]
    lines += ["", "Not identical on the two sides, and why:", ""]
    lines += [f"- {d}" for d in DIFFERENCES]
    return "\n".join(lines)


def print_tables(s: dict[str, Any], prep: dict, ours: dict | None, trl: dict | None, env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    title = (
        f"DPO, rlhfkit vs TRL {TRL_VERSION} ({env['cores']} cores, {env['cpu']}; "
        f"fp32 matmul {env['gflops_start']:.0f} -> {env['gflops_end']:.0f} GFLOP/s)"
    )
    table = Table(title=title)
    for column in ("side", "pairs/s", "train s", "median s/step", "peak RSS MB", "held-out acc", "held-out loss"):
        table.add_column(column, justify="right")
    for name, side in (("rlhfkit", ours), (f"TRL {TRL_VERSION}", trl)):
        table.add_row(
            name,
            _fmt(side, "pairs_per_second", "{:.2f}"),
            _fmt(side, "train_seconds", "{:.1f}"),
            _fmt(side, "median_step_seconds", "{:.2f}"),
            _fmt(side, "peak_rss_mb", "{:.0f}"),
            _fmt(side, "eval_accuracy", "{:.3f}"),
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

    trl_python = ensure_trl_venv(TRL_VENV, TRL_VERSION) if args.only != "ours" else None
    prep = run_worker(
        OUR_PYTHON,
        "_dpo_ours_worker.py",
        ["prepare", str(work / "settings.json"), str(work)],
        work / "prepare.log",
        "prepare",
    )[-1]
    (work / "prepared.json").write_text(json.dumps(prep, indent=2) + "\n")
    log(f"{prep['train_pairs']} training pairs, {prep['eval_pairs']} held out")

    gflops_start = matmul_gflops()
    log(f"fp32 matmul: {gflops_start:.0f} GFLOP/s")
    ours = trl = None
    load: dict[str, float] = {}
    common = [str(work / "settings.json"), str(work / "prepared.json")]
    if args.only in ("both", "ours"):
        shutil.rmtree(work / "ours-run", ignore_errors=True)
        rows = run_worker(
            OUR_PYTHON, "_dpo_ours_worker.py", ["train", *common, str(work / "ours-run")], work / "ours.log", "rlhfkit"
        )
        ours = summarise(rows)
        load["ours"] = os.getloadavg()[0]
    if trl_python is not None:
        shutil.rmtree(work / "trl-run", ignore_errors=True)
        rows = run_worker(trl_python, "_dpo_trl_worker.py", [*common, str(work / "trl-run")], work / "trl.log", "TRL")
        trl = summarise(rows)
        load["trl"] = os.getloadavg()[0]
    gflops_end = matmul_gflops()

    env = {
        **machine(),
        **our_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "gflops_start": gflops_start,
        "gflops_end": gflops_end,
        "load": load,
    }
    report = markdown_report(settings, prep, ours, trl, env)
    print_tables(settings, prep, ours, trl, env)
    (work / "report.md").write_text(report + "\n")
    log(f"total wall time {time.perf_counter() - started:.0f} s; report in {work / 'report.md'}")
    results = args.results or ("" if args.quick or args.only != "both" else str(BENCH / "RESULTS.md"))
    results = "" if args.no_results else results
    if results:
        title = f"DPO: rlhfkit vs TRL {TRL_VERSION} (`bench/dpo_vs_trl.py`{' --quick' if args.quick else ''})"
        write_results_section(Path(results), "dpo_vs_trl", title, report)
        log(f"updated {results}")
    if ours and trl:
        speedup = ours["pairs_per_second"] / trl["pairs_per_second"]
        ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        print(f"dpo speedup vs TRL: {speedup:.2f}x, peak memory ratio: {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""What `grpo_vs_trl.py` and `rloo_vs_trl.py` share: their options, the run of both sides, the tables and the report.

Each script describes its algorithm in an ``Algo`` (its own options, settings, settings rows and the
list of what differs by design) and calls ``main``. The inputs are the PPO benchmark's
(``_prepare.py``: the same cached reward model, exported for TRL, and the prompts in the order
rlhfkit's run takes them); the workers are ``_online_ours_worker.py`` (rlhfkit, the project's venv)
and ``_online_trl_worker.py`` (TRL 1.16.0, ``bench/.venv-trl-reward``, the venv the reward and DPO
benchmarks use), run one after the other. The fp32 matmul rate is measured before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common
from _floors import matmul_gflops
from _online_ours_worker import CONFIG_KEYS
from ppo_vs_trl import reward_comparison, summarise

TRL_VERSION = "1.16.0"
TRL_VENV = common.BENCH / ".venv-trl-reward"  # the reward and DPO benchmarks' venv: the same TRL version, made once
PHASES = ("generate", "score", "train")
SIDES = ("rlhfkit", "TRL")
# label -> (summary key, format): the report's table (all) and the printed one (the first four).
SUMMARY = {
    "median s/step (after warm-up)": ("seconds_per_step", "{:.2f}"),
    "steps/s": ("steps_per_second", "{:.3f}"),
    "peak RSS MB": ("peak_rss_mb", "{:.0f}"),
    "mean reward over all steps": ("reward_mean", "{:+.3f}"),
    "reward at step 1": ("reward_first", "{:+.3f}"),
    "reward at the last step": ("reward_last", "{:+.3f}"),
}
STEP_COLUMNS = (("seconds", "{:.2f}"), ("reward", "{:+.3f}"), ("kl_token", "{:.4f}"), ("response_length", "{:.1f}"))

# What differs by design for both algorithms (each script adds its own).
SHARED_DIFFERENCES = [
    "Models in memory: rlhfkit keeps one frozen base (policy = LoRA adapter, reference = adapters off, reward = a "
    "second adapter); TRL holds the policy (base + LoRA; reference = adapters off) and, in its reward function, "
    "the exported reward model (LoRA merged): two copies of the weights.",
    "Frozen layers: rlhfkit runs the layers below the LoRA once per rollout and continues every role (policy, "
    "reference, reward) and every mini-batch from their output; TRL runs the whole model for the old log-probs, "
    "the reference, each loss step, and the whole reward model.",
    "Reward: TRL gets a reward function (a callable in reward_funcs) that runs the exported sequence-classification "
    "model on the token ids rlhfkit scores (prompt + completion + an EOS where the completion was cut), pooled at "
    "the last token, normalised head. TRL's own model path would decode and re-tokenize prompt + completion "
    "without that EOS, which is not the input the reward model was trained on.",
    "Mini-batch shuffle, LoRA initialisation and sampling draws: each side's own seeded random stream.",
    "Optimizer: both AdamW (eps 1e-5, no weight decay); TRL uses its Trainer's default optim (fused AdamW).",
]


@dataclass
class Algo:
    """One algorithm's side of the shared benchmark."""

    name: str  # grpo | rloo: the CLI command, the worker argument, the last line's first word
    title: str  # GRPO | RLOO
    quick: tuple[int, int, int]  # prompts per step, completions per prompt, mini-batch (completions) with --quick
    full: tuple[int, int, int]  # the same without --quick (rlhfkit's defaults)
    kl_meaning: str  # what the per-token KL column measures on both sides
    differences: list[str]
    add_args: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace], dict[str, Any]]  # the algorithm's own settings
    rows: Callable[[dict[str, Any]], list[tuple[str, str, str]]]  # its own settings rows (setting, rlhfkit, TRL)


# (flag, type, default, help) of the options both algorithms take beside the batch shape.
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("--warmup", int, 1, "warm-up steps a side, left out of the median"),
    ("--model", str, "smollm2-135m", "policy and reward backbone"),
    ("--num-iterations", int, 1, "passes over each batch"),
    ("--max-new-tokens", int, 32, "longest response"),
    ("--max-prompt-tokens", int, 192, "longest formatted prompt"),
    ("--temperature", float, 0.7, "sampling temperature (also for the log-probs)"),
    ("--learning-rate", float, 1e-4, "constant"),
    ("--epsilon", float, 0.2, "ratio clip (both sides of it)"),
    ("--max-grad-norm", float, 1.0, "gradient clipping"),
    ("--lora-r", int, 16, "LoRA rank"),
    ("--lora-alpha", int, 32, "LoRA alpha"),
    ("--trainable-layers", int, 4, "LoRA on the top N layers (0 = all)"),
    ("--seed", int, 0, "prompt order, sampling, initialisation"),
    ("--rm-prompts", int, 128, "prompts (the last ones) for the reward model's data"),
    ("--rm-completions", int, 4, "completions per prompt for the reward model's data"),
)


def parse_args(algo: Algo) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"{algo.title} side by side: rlhfkit against TRL {TRL_VERSION}")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps a side, a small batch")
    p.add_argument("--steps", type=int, default=0, help="timed steps a side (0 = 15, or 3 with --quick)")
    shape = zip(("--batch-size", "--num-generations", "--mini-batch-size"), algo.full, algo.quick, strict=True)
    for flag, full, quick in shape:
        p.add_argument(flag, type=int, default=0, help=f"0 = {full}, or {quick} with --quick")
    for flag, kind, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    algo.add_args(p)
    p.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="on both sides (on: both libraries' default; off: faster, more memory)",
    )
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both", help="run one side (development)")
    p.add_argument("--work", default=str(common.CACHE / f"{algo.name}_vs_trl"), help="logs, runs, settings")
    p.add_argument("--results", default="", help="markdown file to update (default bench/RESULTS.md on full runs)")
    p.add_argument("--no-results", action="store_true", help="update no markdown file (development runs)")
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 15)
    for key, size in zip(
        ("batch_size", "num_generations", "mini_batch_size"), algo.quick if args.quick else algo.full, strict=True
    ):
        setattr(args, key, getattr(args, key) or size)
    if (args.batch_size * args.num_generations) % args.mini_batch_size:
        p.error("--mini-batch-size must divide --batch-size x --num-generations (TRL splits the batch evenly)")
    return args


def settings_from(algo: Algo, args: argparse.Namespace) -> dict[str, Any]:
    """Every setting both workers read (rlhfkit's config field names), and what `_prepare.py` needs."""
    s: dict[str, Any] = {key: getattr(args, key) for key in CONFIG_KEYS if hasattr(args, key)}
    s.update(
        algo=algo.name,
        model=args.model,
        steps=args.warmup + args.steps,
        warmup=args.warmup,
        rm_prompts=args.rm_prompts,
        rm_completions=args.rm_completions,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        normalize_reward=True,
        # The PPO benchmark's reward model (the same keys and values: one cached model serves all three).
        rm_max_new_tokens=32,
        rm_epochs=3,
        rm_learning_rate=1e-3,
        rm_eval_fraction=0.2,
    )
    s.update(algo.settings(args))
    return s


def settings_rows(algo: Algo, s: dict[str, Any], ours: dict | None, trl: dict | None) -> list[tuple[str, str, str]]:
    trl_args = (trl or {}).get("trl_args")
    layers = f"top {s['trainable_layers']}" if s["trainable_layers"] else "all"
    completions = s["batch_size"] * s["num_generations"]
    same = [
        ("policy", s["model"]),
        ("prompts", f"builtin:realtoxicity first {s['steps'] * s['batch_size']}, rlhfkit's seeded order, same groups"),
        ("steps", f"{s['warmup']} warm-up + {s['steps'] - s['warmup']} timed"),
        ("prompts x completions per step", f"{s['batch_size']} x {s['num_generations']} = {completions}"),
        ("mini-batch (one optimizer step)", f"{s['mini_batch_size']} completions, {s['num_iterations']} pass(es)"),
        ("max new tokens", str(s["max_new_tokens"])),
        ("sampling", f"temperature {s['temperature']}, top-k/top-p off, seed {s['seed']}"),
        ("LoRA", f"r={s['lora_r']}, alpha={s['lora_alpha']}, dropout 0, every linear of the {layers} layers"),
        ("learning rate", f"{s['learning_rate']} constant"),
        ("ratio clip epsilon", str(s["epsilon"])),
        ("grad clipping", str(s["max_grad_norm"])),
        ("EOS penalty", "none"),
        ("dtype, device", "fp32, CPU"),
    ]
    rows = [(name, value, "same") for name, value in same]
    rows += algo.rows(s)
    rows.append(("trainable weights", *(f"{(side or {}).get('trainable_params')}" for side in (ours, trl))))
    optim = (trl_args or {}).get("optim", "Trainer default")
    rows += [
        (
            "reward",
            f"reward model on the same backbone (LoRA adapter, {s['rm_prompts']} x {s['rm_completions']} completions "
            "labelled by the nontoxic judge), normalised; reads prompt + response + EOS",
            "the same model exported (LoRA merged, normalisation folded into the head), in a reward function that "
            "reads the same token ids",
        ),
        ("reference", "same base, adapters off", "same base, adapters off (peft, no ref model)"),
        ("optimizer", "torch AdamW, eps 1e-5, wd 0", f"{optim}, eps 1e-5, wd 0"),
        ("gradient checkpointing", "yes (the default)" if s["gradient_checkpointing"] else "no", "same"),
    ]
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _side(side: dict | None, key: str, fmt: str) -> str:
    return "not run" if side is None else _num(side.get(key), fmt)


def markdown_report(algo: Algo, s: dict, prep: dict, ours: dict | None, trl: dict | None, env: dict) -> str:
    rm = prep["reward_model"]
    lines = [
        common.measured_line(env, TRL_VERSION),
        "",
        f"Reward model (both sides): rlhfkit `rlhf reward train` on {rm['train_pairs']} pairs, held-out accuracy "
        f"{_num(rm['eval_accuracy'], '{:.3f}')} on {rm['eval_pairs']} pairs; the TRL export scores within "
        f"{prep['export_max_diff']:.1e} of it.",
        "",
        f"| | rlhfkit `rlhf {algo.name}` | TRL {TRL_VERSION} {algo.title}Trainer |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {_side(ours, *cell)} | {_side(trl, *cell)} |" for label, cell in SUMMARY.items()]
    if ours and trl:
        lines += ["", reward_comparison(ours, trl)]
    if ours and all(phase in ours for phase in PHASES):
        split = ", ".join(f"{phase} {ours[phase]:.2f} s" for phase in PHASES)
        lines += ["", f"rlhfkit's step, median per phase: {split}."]
    lines += [
        "",
        f"Per step (KL: {algo.kl_meaning}; length: response tokens, EOS included):",
        "",
        "| step | " + " | ".join(f"{side} {what}" for what in ("s", "reward", "KL", "length") for side in SIDES) + " |",
        "|---|" + "---|" * 8,
    ]
    a_steps, b_steps = (ours or {}).get("steps", []), (trl or {}).get("steps", [])
    for i in range(max(len(a_steps), len(b_steps))):
        a = a_steps[i] if i < len(a_steps) else {}
        b = b_steps[i] if i < len(b_steps) else {}
        cells = [_num(row.get(key), fmt) for key, fmt in STEP_COLUMNS for row in (a, b)]
        lines.append(f"| {i + 1}{' (warm-up)' if i < s['warmup'] else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Settings:", "", "| setting | rlhfkit | TRL |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in settings_rows(algo, s, ours, trl)]
    lines += ["", "Not identical on the two sides, and why:", ""]
    lines += [f"- {d}" for d in algo.differences]
    return "\n".join(lines)


def print_tables(algo: Algo, s: dict, ours: dict | None, trl: dict | None, env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    title = (
        f"{algo.title} step, rlhfkit vs TRL {TRL_VERSION} ({env['cores']} cores, {env['cpu']}; "
        f"fp32 matmul {env['gflops_start']:.0f} -> {env['gflops_end']:.0f} GFLOP/s)"
    )
    table = Table(title=title)
    shown = list(SUMMARY.items())[:4]
    for column in ("side", *(label for label, _ in shown), "reward per step"):
        table.add_column(column, justify="right")
    for name, side in zip(SIDES, (ours, trl), strict=True):
        curve = " ".join(_num(r.get("reward"), "{:+.2f}") for r in side["steps"]) if side else ""
        table.add_row(name, *(_side(side, *cell) for _, cell in shown), curve)
    console.print(table)
    settings = Table(title="settings")
    for column in ("setting", "rlhfkit", "TRL"):
        settings.add_column(column)
    for row in settings_rows(algo, s, ours, trl):
        settings.add_row(*row)
    console.print(settings)


def run_side(algo: Algo, python: Path, worker: str, work: Path, label: str, warmup: int) -> dict[str, Any]:
    """One side's worker in its own process; its step rows summarised."""
    run_dir = work / f"{label.lower()}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    inputs = [algo.name, str(work / "settings.json"), str(work / "prepared.json"), str(run_dir)]
    rows = common.run_worker(python, worker, inputs, work / f"{label.lower()}.log", label)
    summary = summarise(rows, warmup)
    found = [r.get("trainable_params", r.get("trl_args", {}).get("trainable_params")) for r in rows]
    summary["trainable_params"] = next((n for n in found if n is not None), None)
    return summary


def main(algo: Algo) -> None:
    args = parse_args(algo)
    s = settings_from(algo, args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(s, indent=2) + "\n")
    started = time.perf_counter()

    trl_python = common.ensure_trl_venv(TRL_VENV, TRL_VERSION) if args.only != "ours" else None
    prepare_args = [algo.name, str(work / "settings.json"), str(work)]
    prep = common.run_worker(common.OUR_PYTHON, "_prepare.py", prepare_args, work / "prepare.log", "prepare")[-1]
    (work / "prepared.json").write_text(json.dumps(prep, indent=2) + "\n")
    accuracy, diff = prep["reward_model"]["eval_accuracy"], prep["export_max_diff"]
    common.log(f"reward model: held-out accuracy {accuracy}, TRL export max diff {diff:.1e}")

    env: dict[str, Any] = {"gflops_start": matmul_gflops()}
    common.log(f"fp32 matmul: {env['gflops_start']:.0f} GFLOP/s")
    ours = trl = None
    if args.only in ("both", "ours"):
        ours = run_side(algo, common.OUR_PYTHON, "_online_ours_worker.py", work, "rlhfkit", args.warmup)
    if trl_python is not None:
        trl = run_side(algo, trl_python, "_online_trl_worker.py", work, "TRL", args.warmup)
    env.update(gflops_end=matmul_gflops(), date=time.strftime("%Y-%m-%d"), quick=args.quick)
    env.update(common.machine(), **common.our_versions())

    report = markdown_report(algo, s, prep, ours, trl, env)
    print_tables(algo, s, ours, trl, env)
    (work / "report.md").write_text(report + "\n")
    common.log(f"total wall time {time.perf_counter() - started:.0f} s; report in {work / 'report.md'}")
    results = args.results or ("" if args.quick or args.only != "both" else str(common.BENCH / "RESULTS.md"))
    if results and not args.no_results:
        script = f"bench/{algo.name}_vs_trl.py{' --quick' if args.quick else ''}"
        title = f"{algo.title}: rlhfkit vs TRL {TRL_VERSION} (`{script}`)"
        common.write_results_section(Path(results), f"{algo.name}_vs_trl", title, report)
        common.log(f"updated {results}")
    print(f"fp32 matmul: {env['gflops_start']:.0f} GFLOP/s before, {env['gflops_end']:.0f} GFLOP/s after", flush=True)
    for name, side in zip(SIDES, (ours, trl), strict=True):
        if side:
            curve = " ".join(_num(r.get("reward"), "{:+.3f}") for r in side["steps"])
            speed = f"{side['seconds_per_step']:.2f} s/step, peak RSS {side['peak_rss_mb']:.0f} MB"
            print(f"{name}: {speed}, reward per step {curve}", flush=True)
    if ours and trl:
        print(reward_comparison(ours, trl), flush=True)
        speedup = trl["seconds_per_step"] / ours["seconds_per_step"]
        ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        print(f"{algo.name} speedup vs TRL: {speedup:.2f}x, peak memory ratio: {ratio:.2f}", flush=True)

"""PPO side by side: rlhfkit against TRL 1.12.0's PPOTrainer, same work, one machine, one invocation.

    .venv/bin/python bench/ppo_vs_trl.py --quick      # 1 warm-up + 4 timed steps a side (< 30 min)
    .venv/bin/python bench/ppo_vs_trl.py              # 1 + 15 steps a side; writes bench/RESULTS.md

Same work on both sides: the default policy (SmolLM2-135M-Instruct), the same LoRA (rank, alpha,
target modules, top layers), the same reward model (trained once with rlhfkit on offline preference
data and exported to TRL as a sequence-classification model, scores normalised the same way), the
same prompts in the same batches, batch size, mini-batches, PPO epochs, max new tokens, temperature,
learning rate, KL coefficient and estimator, clip ranges, value coefficient, GAE settings and seed;
non-greedy sampling. Each side runs in its own process (rlhfkit in the project's venv, TRL in
``bench/.venv-trl``, created on first use with the same torch 2.13.0 CPU build and the same
transformers / peft / accelerate), one after the other, with the allocator tunables set. Reported:
median seconds per step after the warm-up step, steps per second, peak RSS of each process, and
the reward (normalised reward-model score) and KL per step on both sides.

The last line is exactly ``ppo speedup vs TRL: X.XXx, peak memory ratio: Y.YY`` (speedup = TRL's
seconds per step / ours; memory ratio = our peak RSS / TRL's).
"""

from __future__ import annotations

import argparse
import json
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

TRL_VERSION = "1.12.0"

# What differs by design, or could not be matched, printed under the table and in RESULTS.md.
DIFFERENCES = [
    "Models in memory: rlhfkit keeps one frozen base (policy = LoRA adapter, reference = adapters off, reward = a "
    "second adapter, value = a third adapter plus a head); TRL holds the policy (base + LoRA; reference = adapters "
    "off), a separate value model and a separate reward model (LoRA merged), three copies of the weights.",
    "Value function: rlhfkit's has its own LoRA adapter on the policy's base (started from the reward adapter) and "
    "a head started from the normalised reward head; TRL needs a separate value model: the base backbone with the "
    "same normalised head, training a LoRA like the policy's plus the head (--trl-value lora; TRL's own examples "
    "train all its weights: --trl-value full).",
    "Gradient clipping: TRL 1.12's PPO loop never clips, so rlhfkit's is off too (--max-grad-norm to set one).",
    "EOS penalty off on both sides: rlhfkit's replaces the score, TRL's subtracts from it (different rules).",
    "Score position: TRL puts the score on the token after the response end (its padding_mask_p1 rule), "
    "rlhfkit on the last response token; both follow their own trainer.",
    "Pad token: TRL finds response ends by the pad id, so its tokenizer pads with <|endoftext|> (not EOS); "
    "rlhfkit tracks lengths with masks. The reward model reads prompt + response + EOS on both sides "
    "(TRL's reward model gets a backbone wrapper that appends the EOS to responses cut without one).",
    "Optimizer: both AdamW, eps 1e-5, weight decay 0.01, constant learning rate; TRL's Trainer excludes biases "
    "and norms from weight decay and uses its default optim (fused AdamW).",
    "Sampling draws differ (each side's random stream); both sample at the same temperature with fixed seeds.",
    "TRL 1.12's PPO never enables gradient checkpointing (its loop bypasses Trainer's); rlhfkit's is turned off "
    "here to match (its default is on).",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 4 timed steps a side (default 1 + 15)")
    p.add_argument("--steps", type=int, default=0, help="timed steps a side (0 = 15, or 4 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps a side, left out of the median")
    p.add_argument("--model", default="smollm2-135m", help="policy and reward backbone (never smaller with --quick)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per PPO step (rlhfkit's default)")
    p.add_argument("--num-mini-batches", type=int, default=2, help="mini-batches per PPO epoch")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--trainable-layers", type=int, default=4, help="LoRA on the top N layers (0 = all)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="rlhfkit's clipping (default off, as TRL's)")
    p.add_argument("--trl-value", choices=["lora", "full"], default="lora", help="what TRL's value model trains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rm-prompts", type=int, default=128, help="prompts (the last ones) for the reward model's data")
    p.add_argument("--rm-completions", type=int, default=4)
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both", help="run one side (development)")
    p.add_argument("--work", default=str(CACHE / "ppo_vs_trl"), help="working folder (logs, runs, settings)")
    p.add_argument("--results", default="", help="markdown file to update (default bench/RESULTS.md on full runs)")
    p.add_argument("--no-results", action="store_true", help="update no markdown file (development runs)")
    args = p.parse_args()
    args.steps = args.steps or (4 if args.quick else 15)
    if args.batch_size % args.num_mini_batches:
        p.error("--batch-size must be a multiple of --num-mini-batches")
    return args


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting both workers read (rlhfkit's PPOConfig field names where there is one)."""
    return {
        "model": args.model,
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "num_mini_batches": args.num_mini_batches,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "temperature": args.temperature,
        "learning_rate": args.learning_rate,
        "lr_schedule": "constant",
        "adam_epsilon": 1e-5,
        "weight_decay": 0.01,
        "kl_coef": args.kl_coef,
        "kl_estimator": args.kl_estimator,
        "clip_range": 0.2,
        "clip_range_value": 0.2,
        "vf_coef": 0.1,
        "gamma": 1.0,
        "lam": 0.95,
        "whiten_rewards": False,
        "normalize_reward": True,
        "missing_eos_penalty": None,
        "max_grad_norm": args.max_grad_norm,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "trainable_layers": args.trainable_layers,
        "trl_value": args.trl_value,
        "seed": args.seed,
        "rm_prompts": args.rm_prompts,
        "rm_completions": args.rm_completions,
        "rm_max_new_tokens": args.max_new_tokens,
        "rm_epochs": 3,
        "rm_learning_rate": 1e-3,
        "rm_eval_fraction": 0.2,
    }


def summarise(rows: list[dict], warmup: int) -> dict[str, Any]:
    steps = [r for r in rows if "step" in r]
    timed = steps[warmup:] or steps
    median = statistics.median(r["seconds"] for r in timed)
    peak = next((r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r), float("nan"))
    rewards = [r["reward"] for r in steps]
    timed_rewards = [r["reward"] for r in timed]
    out = {
        "steps": steps,
        "seconds_per_step": median,
        "steps_per_second": 1 / median,
        "peak_rss_mb": peak,
        "reward_mean": statistics.fmean(rewards),
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_timed": timed_rewards,
    }
    for phase in ("generate", "score", "train"):
        if all(phase in r for r in timed):
            out[phase] = statistics.median(r[phase] for r in timed)
    extra = next((r["trl_args"] for r in rows if "trl_args" in r), None)
    if extra:
        out["trl_args"] = extra
    return out


def reward_comparison(ours: dict[str, Any], trl: dict[str, Any]) -> str:
    """Mean reward over the timed steps on each side and their difference with a 95% interval (steps as samples)."""
    a, b = ours["reward_timed"], trl["reward_timed"]
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return f"Mean reward over the timed steps: rlhfkit {statistics.fmean(a):+.3f}, TRL {statistics.fmean(b):+.3f}."
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    verdict = "within noise" if abs(diff) <= 1.96 * se else "outside the noise of these steps"
    return (
        f"Mean reward over the timed steps: rlhfkit {statistics.fmean(a):+.3f}, TRL {statistics.fmean(b):+.3f}; "
        f"difference {diff:+.3f} +- {1.96 * se:.3f} (95%, steps as samples): {verdict}."
    )


def phase_floors(floors: dict[str, Any], steps: list[dict], warmup: int) -> dict[str, Any]:
    """Per phase: median measured seconds, median FLOPs and floor seconds (FLOPs / matmul rate) of the timed steps."""
    rate = floors["gflops"] * 1e9
    timed = list(range(len(steps)))[warmup:] or list(range(len(steps)))
    out: dict[str, Any] = {"gflops": floors["gflops"]}
    for phase in ("generate", "score", "train"):
        flops = statistics.median(floors["steps"][i][phase] for i in timed)
        out[phase] = {
            "seconds": statistics.median(steps[i][phase] for i in timed),
            "gflop": flops / 1e9,
            "floor": flops / rate,
        }
    total = statistics.median(sum(floors["steps"][i][p] for p in ("generate", "score", "train")) for i in timed)
    out["step"] = {"seconds": statistics.median(steps[i]["seconds"] for i in timed), "gflop": total / 1e9}
    out["step"]["floor"] = total / rate
    return out


def floor_lines(floors: dict[str, Any]) -> list[str]:
    lines = [
        f"rlhfkit's step against its floor: each phase's matmul and attention FLOPs (`bench/_floors.py`) over the "
        f"measured fp32 matmul rate of this CPU ({floors['gflops']:.0f} GFLOP/s, 2048^3 GEMM, best of 5); "
        "medians over the timed steps.",
        "",
        "| phase | measured s | GFLOP | floor s | measured / floor |",
        "|---|---|---|---|---|",
    ]
    for phase in ("generate", "score", "train", "step"):
        f = floors[phase]
        lines.append(
            f"| {phase} | {f['seconds']:.2f} | {f['gflop']:.0f} | {f['floor']:.2f} | {f['seconds'] / f['floor']:.1f}x |"
        )
    return lines


def settings_rows(s: dict[str, Any], trl_args: dict | None) -> list[tuple[str, str, str]]:
    """(setting, rlhfkit, TRL) for every matched or differing setting."""
    layers = f"top {s['trainable_layers']}" if s["trainable_layers"] else "all"
    value_trains = "a LoRA like the policy's + the head" if s["trl_value"] == "lora" else "every weight"
    optim = (trl_args or {}).get("optim", "Trainer default")
    same = [
        ("policy", s["model"]),
        ("prompts", f"builtin:realtoxicity first {s['steps'] * s['batch_size']}, rlhfkit's seeded order, same batches"),
        ("steps", f"{s['warmup']} warm-up + {s['steps'] - s['warmup']} timed"),
        ("batch (prompts per step)", str(s["batch_size"])),
        ("mini-batches x size", f"{s['num_mini_batches']} x {s['batch_size'] // s['num_mini_batches']}"),
        ("PPO epochs", str(s["ppo_epochs"])),
        ("max new tokens", str(s["max_new_tokens"])),
        ("sampling", f"temperature {s['temperature']}, top-k/top-p off, seed {s['seed']}"),
        ("LoRA", f"r={s['lora_r']}, alpha={s['lora_alpha']}, dropout 0, every linear of the {layers} layers"),
        ("learning rate", f"{s['learning_rate']} constant"),
        ("KL", f"coef {s['kl_coef']} fixed, estimator {s['kl_estimator']}"),
        ("clip ranges (policy, value)", f"{s['clip_range']}, {s['clip_range_value']}"),
        ("value coef, gamma, lambda", f"{s['vf_coef']}, {s['gamma']}, {s['lam']}"),
        ("whiten rewards / advantages", "no / yes"),
        ("EOS penalty", "none"),
        ("dtype, device", "fp32, CPU"),
    ]
    rows = [(name, value, "same") for name, value in same]
    rows += [
        (
            "reward",
            f"reward model on the same backbone (LoRA adapter, {s['rm_prompts']} x {s['rm_completions']} completions "
            "labelled by the nontoxic judge), scores normalised",
            "the same model exported (LoRA merged, normalisation folded into the head)",
        ),
        (
            "value function",
            "head on the policy trunk, initialised from the normalised reward head",
            f"separate model, same init; trains {value_trains}",
        ),
        ("reference", "same base, adapters off", "same base, adapters off (ref_model=None with peft)"),
        (
            "grad clipping",
            "off" if s["max_grad_norm"] is None else str(s["max_grad_norm"]),
            "none (TRL 1.12's PPO loop never clips)",
        ),
        ("optimizer", "torch AdamW, eps 1e-5, wd 0.01", f"{optim}, eps 1e-5, wd 0.01"),
    ]  # fmt: skip
    return rows


def markdown_report(s: dict[str, Any], prep: dict, ours: dict | None, trl: dict | None, env: dict[str, Any]) -> str:
    rm = prep["reward_model"]
    lines = [
        f"Measured {env['date']} on {env['cores']} cores ({env['cpu']}; {env['isa']}; {env['memory']} RAM), "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"accelerate {env['accelerate']}, TRL {TRL_VERSION}; `GLIBC_TUNABLES={GLIBC_TUNABLES}` for both runs; "
        "each side in its own process, one after the other.",
        "",
        f"Reward model (both sides): rlhfkit `rlhf reward train` on {rm['train_pairs']} pairs, held-out accuracy "
        f"{_num(rm['eval_accuracy'], '{:.3f}')} on {rm['eval_pairs']} pairs "
        f"({_num(rm['eval_judge_accuracy'], '{:.3f}')} against the judge's order); "
        f"the TRL export scores within {prep['export_max_diff']:.1e} of it.",
        "",
        "| | rlhfkit | TRL 1.12.0 PPOTrainer |",
        "|---|---|---|",
    ]
    for key, label, fmt in (
        ("seconds_per_step", "median s/step (after warm-up)", "{:.2f}"),
        ("steps_per_second", "steps/s", "{:.3f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
        ("reward_mean", "mean reward over all steps", "{:+.3f}"),
        ("reward_first", "reward at step 1", "{:+.3f}"),
        ("reward_last", "reward at the last step", "{:+.3f}"),
    ):
        lines.append(f"| {label} | {_fmt(ours, key, fmt)} | {_fmt(trl, key, fmt)} |")
    if ours and trl:
        lines += ["", reward_comparison(ours, trl)]
    if ours and "floors" in ours:
        lines += ["", *floor_lines(ours["floors"])]
    lines += ["", "Per step (seconds, reward, KL):", "", "| step | rlhfkit s | TRL s | rlhfkit reward | TRL reward | "
              "rlhfkit KL | TRL KL |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    n = max(len(ours["steps"]) if ours else 0, len(trl["steps"]) if trl else 0)
    for i in range(n):
        a = ours["steps"][i] if ours and i < len(ours["steps"]) else {}
        b = trl["steps"][i] if trl and i < len(trl["steps"]) else {}
        tag = " (warm-up)" if i < s["warmup"] else ""
        lines.append(
            f"| {i + 1}{tag} | {_num(a.get('seconds'), '{:.2f}')} | {_num(b.get('seconds'), '{:.2f}')} | "
            f"{_num(a.get('reward'), '{:+.3f}')} | {_num(b.get('reward'), '{:+.3f}')} | "
            f"{_num(a.get('kl'), '{:.3f}')} | {_num(b.get('kl'), '{:.3f}')} |"
        )
    lines += ["", "Settings:", "", "| setting | rlhfkit | TRL |", "|---|---|---|"]
    for name, a, b in settings_rows(s, (trl or {}).get("trl_args")):
        lines.append(f"| {name} | {a} | {b} |")
    lines += ["", "Not identical on the two sides, and why:", ""]
    lines += [f"- {d}" for d in DIFFERENCES]
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _fmt(side: dict | None, key: str, fmt: str) -> str:
    return "not run" if side is None else _num(side.get(key), fmt)


def main() -> None:
    args = parse_args()
    settings = settings_from(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    started = time.perf_counter()

    trl_python = ensure_trl_venv(BENCH / ".venv-trl", TRL_VERSION) if args.only != "ours" else None
    prep = run_worker(
        OUR_PYTHON, "_prepare.py", ["ppo", str(work / "settings.json"), str(work)], work / "prepare.log", "prepare"
    )[-1]
    (work / "prepared.json").write_text(json.dumps(prep, indent=2) + "\n")
    log(
        f"reward model: held-out accuracy {prep['reward_model']['eval_accuracy']}, "
        f"export max diff {prep['export_max_diff']:.1e}"
    )

    ours = trl = None
    common = [str(work / "settings.json"), str(work / "prepared.json")]
    if args.only in ("both", "ours"):
        run_dir = work / "ours-run"
        _clear(run_dir)
        rows = run_worker(OUR_PYTHON, "_ppo_ours_worker.py", [*common, str(run_dir)], work / "ours.log", "rlhfkit")
        ours = summarise(rows, args.warmup)
        floors = run_worker(OUR_PYTHON, "_floors.py", common, work / "floors.log", "floors")[-1]
        ours["floors"] = phase_floors(floors, ours["steps"], args.warmup)
    if trl_python is not None:
        run_dir = work / "trl-run"
        _clear(run_dir)
        rows = run_worker(trl_python, "_ppo_trl_worker.py", [*common, str(run_dir)], work / "trl.log", "TRL")
        trl = summarise(rows, args.warmup)

    env = {**machine(), **our_versions(), "date": time.strftime("%Y-%m-%d")}
    report = markdown_report(settings, prep, ours, trl, env)
    print_tables(settings, ours, trl, env)
    if ours and trl:
        print(reward_comparison(ours, trl), flush=True)
    (work / "report.md").write_text(report + "\n")
    log(f"total wall time {time.perf_counter() - started:.0f} s; report in {work / 'report.md'}")
    results = args.results or ("" if args.quick or args.only != "both" else str(BENCH / "RESULTS.md"))
    results = "" if args.no_results else results
    if results:
        write_results_section(Path(results), "ppo_vs_trl", "PPO: rlhfkit vs TRL 1.12.0 (`bench/ppo_vs_trl.py`)", report)
        log(f"updated {results}")
    if ours and trl:
        speedup = trl["seconds_per_step"] / ours["seconds_per_step"]
        ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        print(f"ppo speedup vs TRL: {speedup:.2f}x, peak memory ratio: {ratio:.2f}", flush=True)


def print_tables(s: dict[str, Any], ours: dict | None, trl: dict | None, env: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    table = Table(title=f"PPO step, rlhfkit vs TRL {TRL_VERSION} ({env['cores']} cores, {env['cpu']})")
    for column in ("side", "median s/step", "steps/s", "peak RSS MB", "mean reward", "reward per step"):
        table.add_column(column, justify="right")
    for name, side in (("rlhfkit", ours), (f"TRL {TRL_VERSION}", trl)):
        if side is None:
            table.add_row(name, "not run", "", "", "", "")
            continue
        per_step = " ".join(f"{r['reward']:+.2f}" for r in side["steps"])
        table.add_row(
            name,
            f"{side['seconds_per_step']:.2f}",
            f"{side['steps_per_second']:.3f}",
            f"{side['peak_rss_mb']:.0f}",
            f"{side['reward_mean']:+.3f}",
            per_step,
        )
    console.print(table)
    if ours and "floors" in ours:
        floors = ours["floors"]
        phases = Table(title=f"rlhfkit phases vs floor (FLOPs / {floors['gflops']:.0f} GFLOP/s measured fp32 matmul)")
        for column in ("phase", "measured s", "GFLOP", "floor s", "measured / floor"):
            phases.add_column(column, justify="right")
        for phase in ("generate", "score", "train", "step"):
            f = floors[phase]
            ratio = f"{f['seconds'] / f['floor']:.1f}x"
            phases.add_row(phase, f"{f['seconds']:.2f}", f"{f['gflop']:.0f}", f"{f['floor']:.2f}", ratio)
        console.print(phases)
    settings = Table(title="settings")
    for column in ("setting", "rlhfkit", "TRL"):
        settings.add_column(column)
    for row in settings_rows(s, (trl or {}).get("trl_args")):
        settings.add_row(*row)
    console.print(settings)


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

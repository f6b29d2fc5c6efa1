"""The ``rlhf`` command line: one subcommand per pipeline stage.

Each command's options are one config dataclass (flags, YAML keys and ``--help`` come from it);
the functions here only wire a config to the stage that does the work and print a summary table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from rlhfkit.config import REQUIRED, config_command, exit_on_user_error, option, save_config
from rlhfkit.console import print_table
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import DEFAULT_MODEL, DEVICE_HELP, DTYPE_HELP

app = typer.Typer(
    help="rlhfkit: from prompts and preference labels to an aligned model (RLHF), offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Inspect and validate dataset files.", no_args_is_help=True)
label_app = typer.Typer(help="Turn candidates into preference labels.", no_args_is_help=True)
reward_app = typer.Typer(help="Train, evaluate and query reward models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(label_app, name="label")
app.add_typer(reward_app, name="reward")
console = Console()


# ----------------------------------------------------------------------------------------------
# rlhf data check


@data_app.command("check")
def data_check(
    file: str = typer.Argument(
        ..., help="Prompt, candidate or preference file (.jsonl/.json/.parquet) or builtin:NAME."
    ),
) -> None:
    """Validate a dataset file: print its detected kind and row count; exit non-zero on any error."""
    from rlhfkit.data import load_dataset

    with exit_on_user_error():
        dataset = load_dataset(file)
    console.print(f"{file}: {dataset.kind} ({dataset.fmt}), {len(dataset.records)} rows", markup=False, highlight=False)


@data_app.command("builtins")
def data_builtins() -> None:
    """List the prompt sets shipped in installed packages (use as --prompts builtin:NAME)."""
    from rlhfkit.data import BUILTIN_PROMPT_SETS

    for name, text in BUILTIN_PROMPT_SETS.items():
        console.print(f"builtin:{name}  {text}")


# ----------------------------------------------------------------------------------------------
# rlhf generate


@dataclass
class GenerateConfig:
    """Options of ``rlhf generate``."""

    prompts: str = option(REQUIRED, "Prompt file (.jsonl/.json/.parquet) or builtin:NAME.", required=True)
    out: str = option(REQUIRED, "Candidates JSONL to write.", required=True)
    model: str = option(DEFAULT_MODEL, "Model: smollm2-135m, tiny-random, a model directory or org/name.")
    num_completions: int = option(2, "Completions sampled per prompt.")
    max_new_tokens: int = option(48, "Longest completion in tokens.")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).")
    seed: int = option(0, "Random seed.")
    batch_size: int = option(16, "Prompts per generation batch (each gives num_completions rows).")
    limit: int = option(0, "Use only the first N prompts (0 = all).")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def __post_init__(self) -> None:
        if self.num_completions < 1 or self.batch_size < 1 or self.limit < 0:
            raise ValueError("num_completions and batch_size must be >= 1, limit >= 0")


def run_generate(cfg: GenerateConfig) -> dict:
    from rlhfkit.data import CandidateRecord, candidate_row, load_prompts, write_jsonl
    from rlhfkit.generation import SamplingParams, generate_completions
    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    records = load_prompts(cfg.prompts)
    if cfg.limit:
        records = records[: cfg.limit]
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model, dtype, device)
    # Finished batches go to OUT.partial as they come: after a kill, the same command continues there.
    journal = Path(cfg.out).with_name(Path(cfg.out).name + ".partial")
    result = generate_completions(
        model,
        tokenizer,
        [r.prompt for r in records],
        cfg.num_completions,
        params,
        cfg.batch_size,
        cfg.seed,
        journal=journal,
        identity={"model": cfg.model},
    )
    rows = [
        candidate_row(CandidateRecord(r.prompt, completions, cfg.model, r.extra))
        for r, completions in zip(records, result.completions, strict=True)
    ]
    write_jsonl(cfg.out, rows)
    journal.unlink()
    summary = {
        "prompts": len(records),
        "completions": len(records) * cfg.num_completions,
        "tokens": result.tokens,
        "tokens/s": (result.tokens - result.resumed_tokens) / max(result.seconds, 1e-9),
        "eos rate": result.eos_count / max(1, len(records) * cfg.num_completions),
        "seconds": result.seconds,
        "device": f"{device} ({str(dtype).removeprefix('torch.')})",
        **({"resumed prompts": result.resumed_prompts} if result.resumed_prompts else {}),
        "written to": cfg.out,
    }
    print_table("generate", summary)
    return summary


config_command(app, "generate", GenerateConfig, run_generate, "Sample K completions per prompt into a candidates file.")


# ----------------------------------------------------------------------------------------------
# rlhf label judge


@dataclass
class LabelJudgeConfig:
    """Options of ``rlhf label judge``."""

    candidates: str = option(REQUIRED, "Candidates file from `rlhf generate`.", required=True)
    out: str = option(REQUIRED, "Preference JSONL to write.", required=True)
    judge: str = option("nontoxic", "Judge: nontoxic, sentiment, clean, module:function or file.py:function.")
    tau: float = option(0.1, "Labeler noise: P(a preferred) = sigmoid((s_a - s_b) / tau).")
    seed: int = option(0, "Seed of the simulated labeler's choices.")
    pairs: str = option("all", "Pairs per prompt: all (every pair of completions) or adjacent (0-1, 2-3, ...).")
    format: str = option(
        "trl", "Output form: trl (prompt/chosen/rejected) or vertex (input_text/candidate_0/1/choice)."
    )
    min_gap: float = option(0.0, "Leave out pairs whose judge scores differ by less than this (ties).")

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.pairs not in ("all", "adjacent"):
            raise ValueError(f"pairs must be 'all' or 'adjacent', got {self.pairs!r}")
        if self.format not in ("trl", "vertex"):
            raise ValueError(f"format must be 'trl' or 'vertex', got {self.format!r}")


def run_label_judge(cfg: LabelJudgeConfig) -> dict:
    from rlhfkit.data import load_candidates, preference_row, write_jsonl
    from rlhfkit.judges import load_judge
    from rlhfkit.labeling.simulated import judge_preferences, label_summary

    candidates = load_candidates(cfg.candidates)
    judge = load_judge(cfg.judge)
    prefs = judge_preferences(candidates, judge, tau=cfg.tau, seed=cfg.seed, pairs=cfg.pairs, min_gap=cfg.min_gap)
    write_jsonl(cfg.out, [preference_row(p, cfg.format) for p in prefs])
    summary = {**label_summary(prefs), "written to": cfg.out}
    print_table(f"label judge ({cfg.judge})", summary)
    return summary


config_command(
    label_app,
    "judge",
    LabelJudgeConfig,
    run_label_judge,
    "Label candidates with a judge (a simulated labeler).",
)


def _register_labeling() -> None:
    from rlhfkit.labeling.commands import register

    register(label_app)


_register_labeling()


# ----------------------------------------------------------------------------------------------
# rlhf reward train | eval | score


def run_reward_train(cfg) -> dict:
    from rlhfkit.reward import train_reward_model

    return train_reward_model(cfg)


@dataclass
class RewardEvalConfig:
    """Options of ``rlhf reward eval``."""

    reward_model: str = option(REQUIRED, "Reward model directory from `rlhf reward train`.", required=True)
    data: str = option(REQUIRED, "Preference dataset to evaluate on.", required=True)
    max_length: int = option(256, "Longest prompt+completion in tokens.")


def run_reward_eval(cfg: RewardEvalConfig) -> dict:
    from rlhfkit.data import load_preferences
    from rlhfkit.reward import evaluate_pairs, load_reward_model

    records = load_preferences(cfg.data)
    model, tokenizer, _ = load_reward_model(cfg.reward_model)
    metrics = {"pairs": len(records), **evaluate_pairs(model, tokenizer, records, cfg.max_length)}
    print_table("reward eval", metrics)
    return metrics


@dataclass
class RewardScoreConfig:
    """Options of ``rlhf reward score``."""

    reward_model: str = option(REQUIRED, "Reward model directory from `rlhf reward train`.", required=True)
    prompt: str = option(REQUIRED, "Prompt text.", required=True)
    completion: str = option(REQUIRED, "Completion text to score.", required=True)


def run_reward_score(cfg: RewardScoreConfig) -> float:
    from rlhfkit.reward import load_reward_model, score_texts

    model, tokenizer, metrics = load_reward_model(cfg.reward_model)
    score = score_texts(model, tokenizer, [cfg.prompt], [cfg.completion])[0]
    mean, std = metrics.get("score_mean", 0.0), metrics.get("score_std", 1.0) or 1.0
    console.print(f"score {score:.4f}  (normalised {(score - mean) / std:+.3f})")
    return score


def _register_reward() -> None:
    from rlhfkit.reward import RewardTrainConfig

    config_command(
        reward_app,
        "train",
        RewardTrainConfig,
        run_reward_train,
        "Train a reward model on preference pairs (Bradley-Terry).",
    )
    config_command(
        reward_app,
        "eval",
        RewardEvalConfig,
        run_reward_eval,
        "Pairwise accuracy of a reward model on a preference file.",
    )
    config_command(reward_app, "score", RewardScoreConfig, run_reward_score, "Score one (prompt, completion).")


_register_reward()


# ----------------------------------------------------------------------------------------------
# rlhf ppo / grpo / rloo


def run_ppo_command(cfg) -> dict:
    from rlhfkit.rl.ppo import run_ppo

    summary = run_ppo(cfg)
    print_table("ppo", summary)
    return summary


def run_grpo_command(cfg) -> dict:
    from rlhfkit.rl.grpo import run_grpo

    summary = run_grpo(cfg)
    print_table("grpo", summary)
    return summary


def run_rloo_command(cfg) -> dict:
    from rlhfkit.rl.rloo import run_rloo

    summary = run_rloo(cfg)
    print_table("rloo", summary)
    return summary


def _register_rl() -> None:
    from rlhfkit.rl.grpo import GRPOConfig
    from rlhfkit.rl.ppo import PPOConfig
    from rlhfkit.rl.rloo import RLOOConfig

    config_command(
        app,
        "ppo",
        PPOConfig,
        run_ppo_command,
        "Fine-tune a policy with PPO against a reward model or judge (`--resume RUN_DIR` continues a run).",
    )
    config_command(
        app,
        "grpo",
        GRPOConfig,
        run_grpo_command,
        "Fine-tune a policy with GRPO (group-relative advantages, no critic) against a reward model or judge.",
    )
    config_command(
        app,
        "rloo",
        RLOOConfig,
        run_rloo_command,
        "Fine-tune a policy with RLOO (leave-one-out baseline, no critic) against a reward model or judge.",
    )


_register_rl()


# ----------------------------------------------------------------------------------------------
# rlhf dpo


def run_dpo_command(cfg) -> dict:
    from rlhfkit.rl.dpo import run_dpo

    summary = run_dpo(cfg)
    print_table("dpo", summary)
    return summary


def _register_dpo() -> None:
    from rlhfkit.rl.dpo import DPOConfig

    config_command(
        app,
        "dpo",
        DPOConfig,
        run_dpo_command,
        "Fine-tune a policy with DPO straight from a preference file, no reward model (`--resume RUN_DIR` continues).",
    )


_register_dpo()


# ----------------------------------------------------------------------------------------------
# rlhf eval


@dataclass
class EvalConfig:
    """Options of ``rlhf eval``."""

    prompts: str = option(REQUIRED, "Held-out prompt file (.jsonl/.json/.parquet) or builtin:NAME.", required=True)
    out: str = option(REQUIRED, "Directory for metrics.json, samples.jsonl, report.html and plots/.", required=True)
    base: str = option(DEFAULT_MODEL, "Base model: smollm2-135m, tiny-random, a model directory or org/name.")
    adapter: list[str] = option([], "Run directory of `rlhf ppo` to compare with the base (repeat for several).")
    reward_model: str = option("", "Reward-model directory to score every completion with (empty = none).")
    judge: list[str] = option(
        ["nontoxic"], "Judge to score with: nontoxic, sentiment, clean or module:function (repeat for several)."
    )
    num_samples: int = option(0, "Evaluate on the first N prompts, one completion each (0 = all).")
    max_new_tokens: int = option(48, "Longest completion in tokens.")
    temperature: float = option(0.7, "Sampling temperature, the same for every model (0 = greedy, no KL).")
    batch_size: int = option(16, "Prompts per generation batch.")
    seed: int = option(0, "Sampling seed, the same for every model (common random numbers).")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.batch_size < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("num_samples must be >= 0, batch_size and max_new_tokens >= 1, temperature >= 0")


def run_eval(cfg: EvalConfig) -> dict:
    from rlhfkit.data import load_prompts, read_rows
    from rlhfkit.evaluation import adapter_names, evaluate, print_comparison
    from rlhfkit.evaluation.report import write_report
    from rlhfkit.generation import SamplingParams
    from rlhfkit.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)  # a missing GPU or a bad dtype fails before anything is written
    dtype = resolve_dtype(cfg.dtype, device)
    records = load_prompts(cfg.prompts)
    if cfg.num_samples:
        records = records[: cfg.num_samples]
    for run in cfg.adapter:
        if not Path(run).is_dir():
            raise RlhfkitError(f"--adapter {run}: no such run directory")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    metrics = evaluate(
        cfg.base,
        cfg.adapter,
        [r.prompt for r in records],
        judges=cfg.judge,
        reward_model=cfg.reward_model or None,
        params=SamplingParams(cfg.max_new_tokens, cfg.temperature),
        seed=cfg.seed,
        out=out,
        batch_size=cfg.batch_size,
        device=device,
        dtype=dtype,
    )
    metrics.pop("examples", None)
    rows = [row for _, row in read_rows(out / "samples.jsonl")]
    report = write_report(out, metrics, rows, adapter_names(cfg.adapter))
    print_comparison(metrics, console)
    console.print(f"wrote {out / 'metrics.json'}, {out / 'samples.jsonl'} and {report}", markup=False)
    return metrics


config_command(
    app,
    "eval",
    EvalConfig,
    run_eval,
    "Base vs tuned on held-out prompts: metrics.json, samples.jsonl and a report.html with plots.",
)


# ----------------------------------------------------------------------------------------------
# rlhf demo (the pipeline lives in rlhfkit.demo)


def _register_demo() -> None:
    from rlhfkit.demo import DemoConfig, run_demo

    config_command(app, "demo", DemoConfig, run_demo, "The whole RLHF loop offline on the default model, one command.")


_register_demo()


# ----------------------------------------------------------------------------------------------
# rlhf serve | export


def _register_serving() -> None:
    from rlhfkit.serving.commands import register

    register(app)


_register_serving()


# glibc's mallopt parameters and the values the Makefile's GLIBC_TUNABLES sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit
_TRIM_THRESHOLD = 16 * 1024**3


def keep_freed_memory() -> bool:
    """Keep freed memory inside glibc's allocator instead of handing it back to the kernel.

    Each decode step and training step allocates and frees the same tens of MB. By default glibc
    serves blocks over a (dynamic) threshold with fresh mmap'd pages and returns them on free, so
    every step pays page faults and zeroing again; on these CPUs that swung timings up to 3x (and a
    decode step at batch 16 ran 11% slower). The Makefile sets GLIBC_TUNABLES for its own commands;
    this gives every ``rlhf`` process the same setting. A GLIBC_TUNABLES the user set wins, and
    where there is no glibc nothing changes. Returns whether the setting was applied.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def main() -> None:
    keep_freed_memory()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Triggered internally.*")
    app()


if __name__ == "__main__":
    main()

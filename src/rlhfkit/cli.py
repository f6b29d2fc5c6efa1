"""The ``rlhf`` command line: one subcommand per pipeline stage.

Each command's options are one config dataclass (flags, YAML keys and ``--help`` come from it);
the functions here only wire a config to the stage that does the work and print a summary table.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from rlhfkit.config import REQUIRED, config_command, exit_on_user_error, option, save_config
from rlhfkit.console import print_table
from rlhfkit.data import prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import DEFAULT_MODEL

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

    def __post_init__(self) -> None:
        if self.num_completions < 1 or self.batch_size < 1 or self.limit < 0:
            raise ValueError("num_completions and batch_size must be >= 1, limit >= 0")


def run_generate(cfg: GenerateConfig) -> dict:
    from rlhfkit.data import CandidateRecord, candidate_row, load_prompts, write_jsonl
    from rlhfkit.generation import SamplingParams, generate_completions
    from rlhfkit.models import load_causal_lm, load_tokenizer

    records = load_prompts(cfg.prompts)
    if cfg.limit:
        records = records[: cfg.limit]
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
    result = generate_completions(
        model, tokenizer, [r.prompt for r in records], cfg.num_completions, params, cfg.batch_size, cfg.seed
    )
    rows = [
        candidate_row(CandidateRecord(r.prompt, completions, cfg.model, r.extra))
        for r, completions in zip(records, result.completions, strict=True)
    ]
    write_jsonl(cfg.out, rows)
    summary = {
        "prompts": len(records),
        "completions": len(records) * cfg.num_completions,
        "tokens": result.tokens,
        "tokens/s": result.tokens / max(result.seconds, 1e-9),
        "eos rate": result.eos_count / max(1, len(records) * cfg.num_completions),
        "seconds": result.seconds,
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
# rlhf ppo


def run_ppo_command(cfg) -> dict:
    from rlhfkit.ppo.trainer import run_ppo

    summary = run_ppo(cfg)
    print_table("ppo", summary)
    return summary


def _register_ppo() -> None:
    from rlhfkit.ppo.trainer import PPOConfig

    config_command(
        app,
        "ppo",
        PPOConfig,
        run_ppo_command,
        "Fine-tune a policy with PPO against a reward model or judge (`--resume RUN_DIR` continues a run).",
    )


_register_ppo()


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

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.batch_size < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("num_samples must be >= 0, batch_size and max_new_tokens >= 1, temperature >= 0")


def run_eval(cfg: EvalConfig) -> dict:
    from rlhfkit.data import load_prompts, read_rows
    from rlhfkit.evaluation import adapter_names, evaluate, print_comparison
    from rlhfkit.evaluation.report import write_report
    from rlhfkit.generation import SamplingParams

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
# rlhf demo


@dataclass
class DemoConfig:
    """Options of ``rlhf demo``."""

    out: str = option("runs/demo", "Directory for every stage's output.")
    quick: bool = option(False, "Smaller settings: 15-40 minutes on a 2-core CPU, with the host's speed.")
    model: str = option(DEFAULT_MODEL, "Model for every stage.")
    prompts: str = option("builtin:realtoxicity", "Prompt set; shuffled with the seed, then split three ways.")
    num_prompts: int = option(0, "Prompts for preference data (0 = 500, or 256 with --quick).")
    held_out: int = option(0, "Held-out prompts for the final evaluation (0 = 100, or 64 with --quick).")
    num_completions: int = option(4, "Completions per prompt (every pair is labelled).")
    max_new_tokens: int = option(32, "Longest completion, in generation, PPO and evaluation.")
    ppo_steps: int = option(0, "PPO steps (0 = 100, or 40 with --quick).")
    seed: int = option(0, "Seed of every stage.")


@contextmanager
def _stage(title: str, key: str, seconds: dict[str, float]) -> Iterator[None]:
    """A rule naming the demo stage, and its wall time recorded under ``key``."""
    console.rule(title)
    started = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - started


def demo_ppo_config(cfg: DemoConfig, demo_dir: Path, steps: int, n_monitor: int, **overrides: object):
    """The demo's PPO stage (``bench/frontier.py`` runs it at other KL settings to choose these)."""
    from rlhfkit.ppo.trainer import PPOConfig

    settings: dict = dict(
        reward=str(demo_dir / "reward_model"),
        prompts=str(demo_dir / "prompts_ppo.jsonl"),
        out=str(demo_dir / "ppo"),
        policy=cfg.model,
        max_steps=steps,
        max_new_tokens=cfg.max_new_tokens,
        # Short completions rarely end on their own here: an EOS penalty would drown the reward.
        missing_eos_penalty=None,
        # Held near 2 nats a response: at a fixed 0.05 the quick demo drifted to 8.9 nats and 89%
        # boilerplate; at this target it cut toxicity 55% at 1.1 nats (bench/frontier.py).
        target_kl=2.0,
        save_every=5,
        seed=cfg.seed,
        # The judge the labels came from, on prompts PPO never sees: does the policy game the RM?
        monitor_judge="nontoxic",
        monitor_prompts=str(demo_dir / "prompts_monitor.jsonl"),
        monitor_num_prompts=n_monitor,
        monitor_every=max(1, steps // (5 if cfg.quick else 10)),
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def run_demo(cfg: DemoConfig) -> dict:
    """Prompts -> generate -> label judge (nontoxic) -> reward train -> ppo -> held-out evaluation."""
    from rlhfkit.data import load_prompts, prompt_row, read_rows, write_jsonl
    from rlhfkit.evaluation import gains_and_losses
    from rlhfkit.reward import RewardTrainConfig

    out = Path(cfg.out)
    if (out / "ppo" / "metrics.jsonl").exists():
        raise RlhfkitError(f"{out}: holds an earlier demo; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    n_rm = cfg.num_prompts or (256 if cfg.quick else 500)
    n_held = cfg.held_out or (64 if cfg.quick else 100)
    steps = cfg.ppo_steps or (40 if cfg.quick else 100)
    prompts = load_prompts(cfg.prompts)
    # The monitor samples its batch 6 (quick) or 11 times: 16 prompts keep the quick demo in budget.
    n_monitor = min(16 if cfg.quick else 32, max(4, len(prompts) // 10))
    if len(prompts) <= n_held + n_monitor + 8:
        raise RlhfkitError(
            f"{cfg.prompts}: {len(prompts)} prompts; need more than --held-out {n_held} + {n_monitor} (monitor) + 8"
        )
    random.Random(cfg.seed).shuffle(prompts)  # builtin sets are grouped by category: mix them
    held, monitor, pool = prompts[-n_held:], prompts[-n_held - n_monitor : -n_held], prompts[: -n_held - n_monitor]
    write_jsonl(out / "prompts_reward.jsonl", [prompt_row(p) for p in pool[:n_rm]])
    write_jsonl(out / "prompts_ppo.jsonl", [prompt_row(p) for p in pool])
    write_jsonl(out / "prompts_monitor.jsonl", [prompt_row(p) for p in monitor])
    write_jsonl(out / "prompts_heldout.jsonl", [prompt_row(p) for p in held])
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    with _stage("1/5 generate candidates", "generate", seconds):
        run_generate(
            GenerateConfig(
                prompts=str(out / "prompts_reward.jsonl"),
                out=str(out / "candidates.jsonl"),
                model=cfg.model,
                num_completions=cfg.num_completions,
                max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed,
            )
        )

    with _stage("2/5 label with the nontoxic judge", "label", seconds):
        # Near-ties (judge scores within 0.05) are left out, as a person's "tie" would be.
        labels = run_label_judge(
            LabelJudgeConfig(
                candidates=str(out / "candidates.jsonl"),
                out=str(out / "preferences.jsonl"),
                seed=cfg.seed,
                tau=0.05,
                min_gap=0.05,
            )
        )

    with _stage("3/5 train the reward model", "reward", seconds):
        reward_metrics = run_reward_train(
            RewardTrainConfig(
                data=str(out / "preferences.jsonl"),
                out=str(out / "reward_model"),
                model=cfg.model,
                seed=cfg.seed,
                epochs=3,
                learning_rate=1e-3,
                eval_fraction=0.2,
                # Mean of the completion's final states: toxicity is spread over the words, and the
                # last token alone overfits (held-out judge accuracy, docs/measurements.md).
                pooling="mean",
                group_by_prompt=False,
            )
        )

    with _stage("4/5 PPO against the reward model", "ppo", seconds):
        ppo_summary = run_ppo_command(demo_ppo_config(cfg, out, steps, n_monitor))

    with _stage("5/5 evaluate base vs tuned on held-out prompts, write the report", "eval", seconds):
        metrics = run_eval(
            EvalConfig(
                prompts=str(out / "prompts_heldout.jsonl"),
                out=str(out / "eval"),
                base=cfg.model,
                adapter=[str(out / "ppo")],
                reward_model=str(out / "reward_model"),
                judge=["nontoxic"],
                max_new_tokens=cfg.max_new_tokens,
                temperature=0.7,
                seed=cfg.seed + 1,
            )
        )
    rows = [row for _, row in read_rows(out / "eval" / "samples.jsonl")]
    examples = gains_and_losses(rows, "tuned", "nontoxic", 5)[0]
    metrics["pipeline"] = {
        "reward_model": {k: reward_metrics.get(k) for k in ("eval_accuracy", "eval_judge_accuracy", "train_pairs")},
        "labels": {k: labels.get(k) for k in ("count", "agreement")},
        "ppo": {k: ppo_summary.get(k) for k in ("steps", "reward_mean", "kl", "monitor_score", "alerts")},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_demo_summary(out, metrics, examples)
    console.print(
        f"wrote {out / 'metrics.json'}, {out / 'SUMMARY.md'} and the report {out / 'eval' / 'report.html'}",
        markup=False,
    )
    return metrics


def _write_demo_summary(out: Path, metrics: dict, examples: list[dict]) -> None:
    """A page a person reads: the headline numbers and a few samples side by side."""
    base, tuned, comp = metrics["base"], metrics["tuned"], metrics["comparison"]

    def ci(m: dict) -> str:
        return f"{m['mean']:.3f} (95% CI {m['ci_low']:.3f} to {m['ci_high']:.3f})"

    diff = comp["nontoxic"]["difference"]
    significant = diff["ci_low"] > 0 or diff["ci_high"] < 0
    verdict = metrics.get("verdict")
    fluency = "| fluency perplexity (lower is better) | {:.1f} | {:.1f} |"
    lines = [
        "# rlhfkit demo",
        "",
        f"Held-out prompts: {metrics['settings']['prompts']}. "
        f"Base `{metrics['settings']['base']}` vs the PPO-tuned adapter.",
        "",
        f"**Verdict: {verdict['summary']}**" if verdict else "Verdict: not computed.",
        "",
        "| | base | tuned |",
        "|---|---|---|",
        f"| nontoxic judge (higher is better) | {ci(base['nontoxic'])} | {ci(tuned['nontoxic'])} |",
        f"| toxicity P(toxic) (lower is better) | {ci(base['toxicity'])} | {ci(tuned['toxicity'])} |",
        f"| reward model | {ci(base['reward'])} | {ci(tuned['reward'])} |",
        f"| response length (tokens) | {ci(base['response_length'])} | {ci(tuned['response_length'])} |",
        f"| EOS rate | {base['eos_rate']:.0%} | {tuned['eos_rate']:.0%} |",
        f"| distinct-2 | {base['distinct_2']:.3f} | {tuned['distinct_2']:.3f} |",
        f"| deflection rate (assistant boilerplate) | {base['deflection_rate']:.0%} | {tuned['deflection_rate']:.0%} |",
        fluency.format(base["fluency_ppl"], tuned["fluency_ppl"])
        if base.get("fluency_ppl") is not None and tuned.get("fluency_ppl") is not None
        else "| fluency perplexity | not scored | not scored |",
        f"| KL from base (nats / response) | 0 | {ci(tuned['kl_from_base'])} |",
        "",
        f"Fluency scorer: {base.get('fluency_scorer', 'none')}.",
        "",
        f"Nontoxic score change: {ci(diff)}: {'significant' if significant else 'not significant'} at 95%; "
        f"tuned wins on {comp['nontoxic']['win_rate']:.0%} of prompts (ties half).",
        "",
        "The full report with training curves, plots and samples: [eval/report.html](eval/report.html).",
        "",
        "## Samples where tuning helped most",
        "",
    ]
    for row in examples:
        lines += [
            f"- **prompt**: {prompt_text(row['prompt'])!r}",
            f"  - base ({row['base_nontoxic']:.2f}): {row['base_completion']!r}",
            f"  - tuned ({row['tuned_nontoxic']:.2f}): {row['tuned_completion']!r}",
        ]
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


config_command(app, "demo", DemoConfig, run_demo, "The whole RLHF loop offline on the default model, one command.")


# ----------------------------------------------------------------------------------------------
# rlhf serve | export


def _register_serving() -> None:
    from rlhfkit.serving.commands import register

    register(app)


_register_serving()


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Triggered internally.*")
    app()


if __name__ == "__main__":
    main()

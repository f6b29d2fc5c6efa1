"""``rlhf demo``: the whole loop offline, one command: prompts -> candidates -> judge labels -> reward
model -> RL (PPO, GRPO or RLOO) -> held-out evaluation and report.

Every stage's settings are fields of ``DemoConfig`` (flags and YAML keys), with the values the
measurements in docs/measurements.md chose as defaults; ``demo_rl_config`` is the RL stage alone,
which ``bench/frontier.py`` reruns at other KL settings.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhfkit.config import option, save_config
from rlhfkit.data import prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import DEFAULT_MODEL

console = Console()
ALGOS = ("ppo", "grpo", "rloo", "dpo")


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
    algo: str = option(
        "ppo", "Fourth stage: ppo, grpo or rloo against the reward model, or dpo straight from the labelled pairs."
    )
    ppo_steps: int = option(0, "RL steps (0 = 100, or 40 with --quick).")
    label_min_gap: float = option(0.05, "Judge-score gap under which a pair is a near-tie and left out.")
    reward_epochs: int = option(3, "Reward model epochs.")
    reward_learning_rate: float = option(1e-3, "Reward model learning rate.")
    reward_pooling: str = option(
        "mean", "Reward model pooling: mean over the completion (toxicity is spread over the words), last, last+mean."
    )
    reward_head_init: str = option(
        "probe", "Reward head start: probe (fit first on the frozen features, then train all: LP-FT) or random."
    )
    target_kl: float = option(2.0, "The RL stage's KL target, nats per response (PPO, RLOO).")
    grpo_beta: float = option(0.04, "GRPO's KL weight in the loss.")
    dpo_beta: float = option(0.1, "DPO's beta (higher = stays closer to the base).")
    dpo_epochs: int = option(3, "DPO epochs over the labelled pairs.")
    seed: int = option(0, "Seed of every stage.")

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")


@contextmanager
def _stage(title: str, key: str, seconds: dict[str, float]) -> Iterator[None]:
    """A rule naming the demo stage, and its wall time recorded under ``key``."""
    console.rule(title)
    started = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - started


def demo_rl_config(cfg: DemoConfig, demo_dir: Path, steps: int, n_monitor: int, **overrides: object) -> Any:
    """The demo's RL stage for ``cfg.algo`` (``bench/frontier.py`` runs it at other KL settings to choose these)."""
    from rlhfkit.rl.grpo import GRPOConfig
    from rlhfkit.rl.ppo import PPOConfig
    from rlhfkit.rl.rloo import RLOOConfig

    settings: dict = dict(
        reward=str(demo_dir / "reward_model"),
        prompts=str(demo_dir / "prompts_ppo.jsonl"),
        out=str(demo_dir / cfg.algo),
        policy=cfg.model,
        max_steps=steps,
        max_new_tokens=cfg.max_new_tokens,
        # Short completions rarely end on their own here: an EOS penalty would drown the reward.
        missing_eos_penalty=None,
        save_every=5,
        seed=cfg.seed,
        # The judge the labels came from, on prompts RL never sees: does the policy game the RM?
        monitor_judge="nontoxic",
        monitor_prompts=str(demo_dir / "prompts_monitor.jsonl"),
        monitor_num_prompts=n_monitor,
        monitor_every=max(1, steps // (5 if cfg.quick else 10)),
    )
    if cfg.algo == "ppo":
        # Held near 2 nats a response: at a fixed 0.05 the quick demo drifted to 8.9 nats and 89%
        # boilerplate; at this target it cut toxicity 55% at 1.1 nats (bench/frontier.py).
        settings.update(target_kl=cfg.target_kl)
        config_class: type = PPOConfig
    elif cfg.algo == "rloo":
        # 8 prompts x 2 completions: PPO's 16 rollouts a step, the same KL target.
        settings.update(target_kl=cfg.target_kl, batch_size=8, num_generations=2)
        config_class = RLOOConfig
    else:
        # 4 prompts x 4 completions: PPO's 16 rollouts a step (TRL's 8 a prompt would double it).
        settings.update(beta=cfg.grpo_beta, batch_size=4, num_generations=4)
        config_class = GRPOConfig
    settings.update(overrides)
    return config_class(**settings)


def run_demo(cfg: DemoConfig) -> dict:
    """Prompts -> generate -> label judge (nontoxic) -> reward train -> RL -> held-out evaluation."""
    from rlhfkit.cli import (
        EvalConfig,
        GenerateConfig,
        LabelJudgeConfig,
        run_dpo_command,
        run_eval,
        run_generate,
        run_grpo_command,
        run_label_judge,
        run_ppo_command,
        run_reward_train,
        run_rloo_command,
    )
    from rlhfkit.data import load_prompts, prompt_row, read_rows, write_jsonl
    from rlhfkit.evaluation import gains_and_losses
    from rlhfkit.reward import RewardTrainConfig
    from rlhfkit.rl.dpo import DPOConfig

    out = Path(cfg.out)
    if any((out / algo / "metrics.jsonl").exists() for algo in ALGOS):
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
                min_gap=cfg.label_min_gap,
            )
        )

    with _stage("3/5 train the reward model", "reward", seconds):
        reward_metrics = run_reward_train(
            RewardTrainConfig(
                data=str(out / "preferences.jsonl"),
                out=str(out / "reward_model"),
                model=cfg.model,
                seed=cfg.seed,
                epochs=cfg.reward_epochs,
                learning_rate=cfg.reward_learning_rate,
                eval_fraction=0.2,
                # Mean of the completion's final states: toxicity is spread over the words, and the
                # last token alone overfits (held-out judge accuracy, docs/measurements.md).
                pooling=cfg.reward_pooling,
                # The head first fit as a linear probe, then adapters and head together (LP-FT), in
                # batches grouped by prompt: held-out judge accuracy 0.783 against 0.762 for a random
                # head on random batches, in 381 s against 530 s (docs/measurements.md).
                head_init=cfg.reward_head_init,
            )
        )

    if cfg.algo == "dpo":
        with _stage("4/5 DPO on the labelled pairs (the reward model only scores the evaluation)", "dpo", seconds):
            rl_summary = run_dpo_command(
                DPOConfig(
                    data=str(out / "preferences.jsonl"),
                    out=str(out / "dpo"),
                    policy=cfg.model,
                    beta=cfg.dpo_beta,
                    epochs=cfg.dpo_epochs,
                    eval_fraction=0.2,
                    seed=cfg.seed,
                    monitor_prompts=str(out / "prompts_monitor.jsonl"),
                    monitor_num_prompts=n_monitor,
                    monitor_max_new_tokens=cfg.max_new_tokens,
                )
            )
    else:
        with _stage(f"4/5 {cfg.algo.upper()} against the reward model", cfg.algo, seconds):
            command = {"ppo": run_ppo_command, "grpo": run_grpo_command, "rloo": run_rloo_command}[cfg.algo]
            rl_summary = command(demo_rl_config(cfg, out, steps, n_monitor))

    with _stage("5/5 evaluate base vs tuned on held-out prompts, write the report", "eval", seconds):
        metrics = run_eval(
            EvalConfig(
                prompts=str(out / "prompts_heldout.jsonl"),
                out=str(out / "eval"),
                base=cfg.model,
                adapter=[str(out / cfg.algo)],
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
        cfg.algo: {
            k: rl_summary.get(k)
            for k in ("steps", "reward_mean", "kl", "monitor_score", "alerts", "eval_accuracy", "monitor_kl")
            if k in rl_summary
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_demo_summary(out, metrics, examples, cfg.algo)
    console.print(
        f"wrote {out / 'metrics.json'}, {out / 'SUMMARY.md'} and the report {out / 'eval' / 'report.html'}",
        markup=False,
    )
    return metrics


def _write_demo_summary(out: Path, metrics: dict, examples: list[dict], algo: str) -> None:
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
        f"Base `{metrics['settings']['base']}` vs the {algo.upper()}-tuned adapter.",
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

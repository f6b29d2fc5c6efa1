"""``rlhf demo``: the whole loop offline, one command: prompts -> candidates -> judge labels -> reward
model -> RL (PPO, GRPO or RLOO) -> held-out evaluation and report.

Every stage's settings are fields of ``DemoConfig`` (flags and YAML keys), with the values the
measurements in docs/measurements.md chose as defaults; ``demo_rl_config`` is the RL stage alone,
which ``bench/frontier.py`` reruns at other KL settings.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhfkit.config import load_yaml_config, option, save_config
from rlhfkit.data import prompt_text, write_text_atomic
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
    fresh: bool = option(False, "Start over: delete what an earlier (or killed) demo left in the output directory.")

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")


class _Stages:
    """The demo's stages in one directory: each finished one is recorded in ``stages.json`` (what it
    returned, its wall time), so a demo run again after a kill reuses it instead of redoing it."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, key: str, title: str, stage: Callable[[], dict]) -> dict:
        if key in self.done:
            console.rule(f"{title}: finished earlier, reused")
            return self.done[key]["result"]
        console.rule(title)
        started = time.perf_counter()
        result = stage()
        self.done[key] = {"result": result, "seconds": time.perf_counter() - started}
        write_text_atomic(self.path, json.dumps(self.done, indent=2, default=str) + "\n")
        return json.loads(json.dumps(result, default=str))  # what a reused stage gives, too

    @property
    def seconds(self) -> dict[str, float]:
        return {key: stage["seconds"] for key, stage in self.done.items()}


def _open_demo_dir(cfg: DemoConfig, out: Path) -> None:
    """A new demo directory, or the same demo's after a kill; another demo's is refused (or, with
    ``fresh``, deleted)."""
    saved = out / "config.yaml"
    # A directory is taken for a demo's only if its config.yaml reads as one (else this raises).
    earlier = load_yaml_config(DemoConfig, saved) if saved.exists() else None
    if earlier is not None and cfg.fresh:
        shutil.rmtree(out)
    elif earlier is not None:
        differ = [
            f"--{f.name.replace('_', '-')} ({earlier.get(f.name, f.default)!r} there, {getattr(cfg, f.name)!r} here)"
            for f in dataclasses.fields(DemoConfig)
            if f.name not in ("out", "fresh") and earlier.get(f.name, f.default) != getattr(cfg, f.name)
        ]
        if differ:
            raise RlhfkitError(
                f"{out}: holds a demo made with other settings: {', '.join(differ)}. Run it with those "
                "settings to continue it, add --fresh to start over there, or pass another --out"
            )
        console.print(f"continuing the demo in {out}: finished stages are reused, a killed one resumes")
    elif any((out / algo / "metrics.jsonl").exists() for algo in ALGOS):
        raise RlhfkitError(f"{out}: holds runs that are not a demo's; remove them or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


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
    _open_demo_dir(cfg, out)
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
    stages = _Stages(out)

    # A killed generation continues from its journal (candidates.jsonl.partial) by itself.
    stages.run(
        "generate",
        "1/5 generate candidates",
        lambda: run_generate(
            GenerateConfig(
                prompts=str(out / "prompts_reward.jsonl"),
                out=str(out / "candidates.jsonl"),
                model=cfg.model,
                num_completions=cfg.num_completions,
                max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed,
            )
        ),
    )

    # Near-ties (judge scores within 0.05) are left out, as a person's "tie" would be.
    labels = stages.run(
        "label",
        "2/5 label with the nontoxic judge",
        lambda: run_label_judge(
            LabelJudgeConfig(
                candidates=str(out / "candidates.jsonl"),
                out=str(out / "preferences.jsonl"),
                seed=cfg.seed,
                tau=0.05,
                min_gap=cfg.label_min_gap,
            )
        ),
    )

    def started_before(run_dir: Path) -> bool:  # a stage killed after it opened its run directory
        return (run_dir / "config.yaml").exists()

    def train_reward() -> dict:
        if started_before(out / "reward_model"):
            return run_reward_train(RewardTrainConfig(resume=str(out / "reward_model")))
        return run_reward_train(
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

    reward_metrics = stages.run("reward", "3/5 train the reward model", train_reward)

    def tune() -> dict:
        run_dir = out / cfg.algo
        if cfg.algo == "dpo":
            if started_before(run_dir):
                return run_dpo_command(DPOConfig(resume=str(run_dir)))
            return run_dpo_command(
                DPOConfig(
                    data=str(out / "preferences.jsonl"),
                    out=str(run_dir),
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
        command = {"ppo": run_ppo_command, "grpo": run_grpo_command, "rloo": run_rloo_command}[cfg.algo]
        rl_config = demo_rl_config(cfg, out, steps, n_monitor)
        if started_before(run_dir):
            return command(type(rl_config)(resume=str(run_dir)))
        return command(rl_config)

    if cfg.algo == "dpo":
        title = "4/5 DPO on the labelled pairs (the reward model only scores the evaluation)"
    else:
        title = f"4/5 {cfg.algo.upper()} against the reward model"
    rl_summary = stages.run(cfg.algo, title, tune)

    # A killed evaluation starts again (it holds no checkpoint; minutes at most).
    metrics = stages.run(
        "eval",
        "5/5 evaluate base vs tuned on held-out prompts, write the report",
        lambda: run_eval(
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
        ),
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
        "seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
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
    write_text_atomic(out / "SUMMARY.md", "\n".join(lines) + "\n")

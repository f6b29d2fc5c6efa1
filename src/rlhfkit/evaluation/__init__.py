"""Before/after evaluation: the base model and a tuned one on the same held-out prompts.

Both models sample with the same settings and the same seed (common random numbers), so their
difference is the tuning and not the dice. Per model: mean and 95% confidence interval of every
judge and of the reward model, raw toxicity, response length, EOS rate; per tuned model: win rate
over the base (ties count half), the paired difference with its interval, and the sequence-level
KL from the base estimated on the tuned samples.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.data import Prompt, prompt_text, write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.judges import distinct_n, load_judge, toxicity
from rlhfkit.models import final_hidden, load_causal_lm, load_tokenizer
from rlhfkit.ppo.trainer import response_logprobs
from rlhfkit.reward import load_reward_model, score_texts

Z95 = 1.959963984540054
LOWER_IS_BETTER = {"toxicity"}


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean with a normal-approximation 95% confidence interval."""
    n = len(values)
    mean = sum(values) / n
    half = Z95 * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def win_rate(tuned: Sequence[float], base: Sequence[float]) -> float:
    """Fraction of prompts where tuned beats base; a tie counts half."""
    wins = [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base, strict=True)]
    return sum(wins) / len(wins)


def tuned_models(
    model: torch.nn.Module, run_dir: str | Path | None
) -> tuple[torch.nn.Module | None, torch.nn.Module, Callable[[], AbstractContextManager]]:
    """(tuned model, the module that is the base, a context in which it is the base).

    A LoRA run (``adapter/``) wraps ``model``: the base is the wrapper with its adapters switched
    off. A full fine-tune (``model/``) is a second model, and the base is ``model`` itself.
    """
    if run_dir is None:
        return None, model, nullcontext
    folder = Path(run_dir)
    if (folder / "adapter" / "adapter_config.json").exists():
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, folder / "adapter")
        return tuned, tuned, tuned.disable_adapter
    if (folder / "model" / "config.json").exists():
        return load_causal_lm(str(folder / "model")), model, nullcontext
    raise RlhfkitError(f"{folder}: no adapter/ or model/ inside; expected a run directory of `rlhf ppo`")


@dataclass
class Samples:
    texts: list[str]
    ids: torch.Tensor  # (N, Lq + Lr): query left-padded, response right-padded
    mask: torch.Tensor
    query_len: int
    lengths: list[int]
    ended: list[bool]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    seed: int,
    batch_size: int = 16,
) -> list[Samples]:
    """One completion per prompt, in batches; returns the batches (ids kept for log-probs)."""
    torch.manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(encoded), batch_size):
        q_ids, q_mask = left_pad(encoded[start : start + batch_size], pad)
        batch = sample_batch(model, tokenizer, q_ids, q_mask, params)
        out.append(
            Samples(
                batch.texts,
                torch.cat([q_ids, batch.responses], 1),
                torch.cat([q_mask, batch.mask], 1),
                q_ids.shape[1],
                batch.lengths.tolist(),
                batch.ended.tolist(),
            )
        )
    return out


@torch.no_grad()
def sequence_logprob(model: torch.nn.Module, batch: Samples, temperature: float) -> torch.Tensor:
    hidden = final_hidden(model, batch.ids, batch.mask)
    logp, _ = response_logprobs(model, hidden, batch.ids, batch.query_len, temperature)
    response_mask = batch.mask[:, batch.query_len :].float()
    return (logp * response_mask).sum(-1)


def evaluate(
    base: str,
    adapter_dir: str | Path | None,
    prompts: Sequence[Prompt],
    judges: Sequence[str] = ("nontoxic",),
    reward_model: str | Path | None = None,
    params: SamplingParams | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    num_examples: int = 5,
) -> dict:
    """Compare the base model with its tuned adapter; writes metrics.json and samples.jsonl to ``out``."""
    params = params or SamplingParams(max_new_tokens=48, temperature=0.7)
    if not prompts:
        raise RlhfkitError("evaluation needs at least one prompt")
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base)
    tuned_model, base_model, base_view = tuned_models(model, adapter_dir)
    batches = {}
    with base_view():
        batches["base"] = sample(base_model, tokenizer, prompts, params, seed)
    if tuned_model is not None:
        batches["tuned"] = sample(tuned_model, tokenizer, prompts, params, seed)
    texts = {name: [t for b in bs for t in b.texts] for name, bs in batches.items()}

    plain = [prompt_text(p) for p in prompts]
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in texts}
    for spec in judges:
        judge = load_judge(spec)
        for name, completions in texts.items():
            scores[name][judge.name] = judge(plain, completions)
            if judge.name == "nontoxic":
                scores[name]["toxicity"] = toxicity(completions)
    if reward_model is not None:
        rm, rm_tok, _ = load_reward_model(reward_model)
        for name, completions in texts.items():
            scores[name]["reward"] = score_texts(rm, rm_tok, list(prompts), completions)

    metrics: dict[str, dict] = {}
    for name, bs in batches.items():
        lengths = [n for b in bs for n in b.lengths]
        ended = [e for b in bs for e in b.ended]
        metrics[name] = {key: mean_ci(values) for key, values in scores[name].items()}
        metrics[name]["response_length"] = mean_ci([float(n) for n in lengths])
        metrics[name]["eos_rate"] = sum(ended) / len(ended)
        metrics[name]["distinct_1"] = distinct_n(texts[name], 1)
        metrics[name]["distinct_2"] = distinct_n(texts[name], 2)
    if "tuned" in batches:
        comparison: dict[str, dict] = {}
        for key in scores["tuned"]:
            diffs = [t - b for t, b in zip(scores["tuned"][key], scores["base"][key], strict=True)]
            tuned_scores, base_scores = scores["tuned"][key], scores["base"][key]
            if key in LOWER_IS_BETTER:  # a win is a lower toxicity
                tuned_scores, base_scores = [-x for x in tuned_scores], [-x for x in base_scores]
            comparison[key] = {"win_rate": win_rate(tuned_scores, base_scores), "difference": mean_ci(diffs)}
        if params.temperature > 0:  # greedy outputs have no distribution to compare
            kl = []
            for b in batches["tuned"]:
                tuned_lp = sequence_logprob(tuned_model, b, params.temperature)
                with base_view():
                    base_lp = sequence_logprob(base_model, b, params.temperature)
                kl.extend((tuned_lp - base_lp).tolist())
            metrics["tuned"]["kl_from_base"] = mean_ci(kl)
        metrics["comparison"] = comparison
    metrics["settings"] = {
        "base": base,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "prompts": len(prompts),
        "seed": seed,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        rows = []
        for i, p in enumerate(prompts):
            row: dict = {"prompt": p}
            for name in texts:
                row[f"{name}_completion"] = texts[name][i]
                row.update({f"{name}_{k}": round(v[i], 6) for k, v in scores[name].items()})
            rows.append(row)
        write_jsonl(folder / "samples.jsonl", rows)
        metrics["examples"] = _examples(rows, num_examples)
    return metrics


def _examples(rows: list[dict], n: int) -> list[dict]:
    """The prompts where tuned gained most on the first judge: what a person looks at first."""
    key = next((k.removeprefix("tuned_") for k in rows[0] if k.startswith("tuned_") and k != "tuned_completion"), None)
    if key is None:
        return rows[:n]
    return sorted(rows, key=lambda r: r[f"base_{key}"] - r[f"tuned_{key}"])[:n]


def print_comparison(metrics: dict, console: Console | None = None) -> None:
    """A table of every metric, base beside tuned, with intervals and win rates."""
    console = console or Console()
    table = Table(title="held-out evaluation: base vs tuned (mean [95% CI])")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("tuned - base", justify="right")
    table.add_column("win rate", justify="right")

    def fmt(value: object) -> str:
        if isinstance(value, dict) and "mean" in value:
            return f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    base, tuned, comparison = metrics["base"], metrics.get("tuned", {}), metrics.get("comparison", {})
    for key in base:
        diff = comparison.get(key, {})
        table.add_row(
            key,
            fmt(base[key]),
            fmt(tuned.get(key, "")),
            fmt(diff["difference"]) if diff else "",
            f"{diff['win_rate']:.2f}" if diff else "",
        )
    if "kl_from_base" in tuned:
        table.add_row("kl_from_base", "0", fmt(tuned["kl_from_base"]), "", "")
    console.print(table)

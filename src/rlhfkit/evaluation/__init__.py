"""Before/after evaluation: the base model and a tuned one on the same held-out prompts.

Both models sample with the same settings and the same seed (common random numbers), so their
difference is the tuning and not the dice. Per model: mean and 95% confidence interval of every
judge and of the reward model, raw toxicity, response length, EOS rate; per tuned model: win rate
over the base (ties count half), the paired difference with its interval, and the sequence-level
KL from the base estimated on the tuned samples.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.console import progress_bar
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


def adapter_names(run_dirs: Sequence[str | Path]) -> dict[str, Path]:
    """A short unique name per tuned run (its folder name), in the order given."""
    names: dict[str, Path] = {}
    for run_dir in run_dirs:
        folder = Path(run_dir)
        name, k = folder.name or "tuned", 2
        while name in names:
            name, k = f"{folder.name}-{k}", k + 1
        names[name] = folder
    return names


def tuned_models(
    model: torch.nn.Module, run_dirs: dict[str, Path]
) -> tuple[dict[str, tuple[torch.nn.Module, Callable[[], AbstractContextManager]]], torch.nn.Module, Callable]:
    """Each tuned model with the context that activates it; the base module and its context.

    LoRA runs (``adapter/``) all load onto ``model`` as named peft adapters, so one copy of the
    weights serves every run; the base is that wrapper with adapters off. A full fine-tune
    (``model/``) is a model of its own.
    """
    tuned: dict[str, tuple[torch.nn.Module, Callable[[], AbstractContextManager]]] = {}
    wrapper = None
    for name, folder in run_dirs.items():
        if (folder / "adapter" / "adapter_config.json").exists():
            from peft import PeftModel

            if wrapper is None:
                wrapper = PeftModel.from_pretrained(model, folder / "adapter", adapter_name=name)
            else:
                wrapper.load_adapter(folder / "adapter", adapter_name=name)
            tuned[name] = (wrapper, functools.partial(_active_adapter, wrapper, name))
        elif (folder / "model" / "config.json").exists():
            tuned[name] = (load_causal_lm(str(folder / "model")), nullcontext)
        else:
            raise RlhfkitError(f"{folder}: no adapter/ or model/ inside; expected a run directory of `rlhf ppo`")
    if wrapper is None:
        return tuned, model, nullcontext
    return tuned, wrapper, wrapper.disable_adapter


@contextmanager
def _active_adapter(wrapper: torch.nn.Module, name: str) -> Iterator[None]:
    wrapper.set_adapter(name)
    yield


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
    on_batch: Callable[[int], None] | None = None,
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
        if on_batch is not None:
            on_batch(len(batch.texts))
    return out


@torch.no_grad()
def sequence_logprob(model: torch.nn.Module, batch: Samples, temperature: float) -> torch.Tensor:
    hidden = final_hidden(model, batch.ids, batch.mask)
    logp, _ = response_logprobs(model, hidden, batch.ids, batch.query_len, temperature)
    response_mask = batch.mask[:, batch.query_len :].float()
    return (logp * response_mask).sum(-1)


def evaluate(
    base: str,
    adapters: str | Path | Sequence[str | Path] | None,
    prompts: Sequence[Prompt],
    judges: Sequence[str] = ("nontoxic",),
    reward_model: str | Path | None = None,
    params: SamplingParams | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    num_examples: int = 5,
    batch_size: int = 16,
) -> dict:
    """Compare the base model with each tuned run; writes metrics.json and samples.jsonl to ``out``.

    With one run, ``metrics["tuned"]`` and ``metrics["comparison"]`` hold its numbers; with several,
    they map each run's name to them. Samples use the keys ``base_*`` and ``tuned_*`` (one run) or
    ``tuned_<name>_*`` (several).
    """
    params = params or SamplingParams(max_new_tokens=48, temperature=0.7)
    if not prompts:
        raise RlhfkitError("evaluation needs at least one prompt")
    if adapters is None:
        adapters = []
    elif isinstance(adapters, (str, Path)):
        adapters = [adapters]
    runs = adapter_names(adapters)
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base)
    tuned, base_model, base_view = tuned_models(model, runs)
    single = len(tuned) == 1
    key_of = {name: "tuned" if single else f"tuned_{name}" for name in tuned}

    batches: dict[str, list[Samples]] = {}
    progress = progress_bar("eval: sampling")
    with progress:
        task = progress.add_task("sample", total=len(prompts) * (1 + len(tuned)), info="base")

        def advance(n: int) -> None:
            progress.advance(task, n)

        with base_view():
            batches["base"] = sample(base_model, tokenizer, prompts, params, seed, batch_size, advance)
        for name, (module, active) in tuned.items():
            progress.update(task, info=name)
            with active():
                batches[key_of[name]] = sample(module, tokenizer, prompts, params, seed, batch_size, advance)
    texts = {key: [t for b in bs for t in b.texts] for key, bs in batches.items()}

    plain = [prompt_text(p) for p in prompts]
    scores: dict[str, dict[str, list[float]]] = {key: {} for key in texts}
    for spec in judges:
        judge = load_judge(spec)
        for key, completions in texts.items():
            scores[key][judge.name] = judge(plain, completions)
            if judge.name == "nontoxic":
                scores[key]["toxicity"] = toxicity(completions)
    if reward_model is not None:
        rm, rm_tok, _ = load_reward_model(reward_model)
        for key, completions in texts.items():
            scores[key]["reward"] = score_texts(rm, rm_tok, list(prompts), completions)

    per_model: dict[str, dict] = {}
    for key, bs in batches.items():
        lengths = [n for b in bs for n in b.lengths]
        ended = [e for b in bs for e in b.ended]
        per_model[key] = {metric: mean_ci(values) for metric, values in scores[key].items()}
        per_model[key]["response_length"] = mean_ci([float(n) for n in lengths])
        per_model[key]["eos_rate"] = sum(ended) / len(ended)
        per_model[key]["distinct_1"] = distinct_n(texts[key], 1)
        per_model[key]["distinct_2"] = distinct_n(texts[key], 2)
    comparisons: dict[str, dict] = {}
    for name, (module, active) in tuned.items():
        key = key_of[name]
        comparison: dict[str, dict] = {}
        for metric in scores[key]:
            tuned_scores, base_scores = scores[key][metric], scores["base"][metric]
            diffs = [t - b for t, b in zip(tuned_scores, base_scores, strict=True)]
            if metric in LOWER_IS_BETTER:  # a win is a lower toxicity
                tuned_scores, base_scores = [-x for x in tuned_scores], [-x for x in base_scores]
            comparison[metric] = {"win_rate": win_rate(tuned_scores, base_scores), "difference": mean_ci(diffs)}
        comparisons[name] = comparison
        if params.temperature > 0:  # greedy outputs have no distribution to compare
            kl = []
            for b in batches[key]:
                with active():
                    tuned_lp = sequence_logprob(module, b, params.temperature)
                with base_view():
                    base_lp = sequence_logprob(base_model, b, params.temperature)
                kl.extend((tuned_lp - base_lp).tolist())
            per_model[key]["kl_from_base"] = mean_ci(kl)

    metrics: dict = {"base": per_model["base"]}
    if tuned:
        if single:
            (name,) = tuned
            metrics["tuned"], metrics["comparison"] = per_model["tuned"], comparisons[name]
        else:
            metrics["tuned"] = {name: per_model[key_of[name]] for name in tuned}
            metrics["comparison"] = comparisons
    metrics["settings"] = {
        "base": base,
        "adapters": {name: str(folder) for name, folder in runs.items()},
        "reward_model": str(reward_model) if reward_model else None,
        "judges": list(judges),
        "prompts": len(prompts),
        "seed": seed,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
    }
    rows = []
    for i, p in enumerate(prompts):
        row: dict = {"prompt": p}
        for key in texts:
            row[f"{key}_completion"] = texts[key][i]
            row.update({f"{key}_{metric}": round(v[i], 6) for metric, v in scores[key].items()})
        rows.append(row)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_jsonl(folder / "samples.jsonl", rows)
    metrics["examples"] = _examples(rows, num_examples)
    return metrics


def tuned_entries(metrics: dict) -> list[tuple[str, dict, dict]]:
    """(name, tuned metrics, comparison) per tuned run, whether one run or several were evaluated."""
    if "tuned" not in metrics:
        return []
    if "response_length" in metrics["tuned"]:
        return [("tuned", metrics["tuned"], metrics["comparison"])]
    return [(name, m, metrics["comparison"][name]) for name, m in metrics["tuned"].items()]


def primary_metric(metrics: dict) -> str:
    """The score a reader looks at first: the reward model's when there is one, else the first judge's."""
    scored = [k for k, v in metrics["base"].items() if isinstance(v, dict) and k not in ("response_length",)]
    return "reward" if "reward" in scored else next((k for k in scored if k not in LOWER_IS_BETTER), scored[0])


def gains_and_losses(rows: list[dict], model_key: str, metric: str, n: int) -> tuple[list[dict], list[dict]]:
    """The ``n`` prompts where the tuned model gained most on ``metric``, and the ``n`` where it lost most."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    ranked = sorted(rows, key=lambda r: sign * (r[f"{model_key}_{metric}"] - r[f"base_{metric}"]), reverse=True)
    gains = [r for r in ranked[:n] if sign * (r[f"{model_key}_{metric}"] - r[f"base_{metric}"]) > 0]
    losses = [r for r in ranked[::-1][:n] if sign * (r[f"{model_key}_{metric}"] - r[f"base_{metric}"]) < 0]
    return gains, losses


def _examples(rows: list[dict], n: int) -> list[dict]:
    """The prompts where the (first) tuned model gained most on the first judge."""
    key = next((k for k in rows[0] if k.startswith("tuned") and k.endswith("_completion")), None)
    if key is None:
        return rows[:n]
    model_key = key.removesuffix("_completion")
    metric = next((k.removeprefix("base_") for k in rows[0] if k.startswith("base_") and k != "base_completion"), None)
    if metric is None:
        return rows[:n]
    return gains_and_losses(rows, model_key, metric, n)[0]


def _fmt(value: object) -> str:
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_comparison(metrics: dict, console: Console | None = None) -> None:
    """A table of every metric, base beside each tuned run, with intervals and win rates."""
    console = console or Console()
    base = metrics["base"]
    for name, tuned, comparison in tuned_entries(metrics) or [("tuned", {}, {})]:
        title = "held-out evaluation: base vs " + ("tuned" if name == "tuned" else name) + " (mean [95% CI])"
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("base", justify="right")
        table.add_column("tuned", justify="right")
        table.add_column("tuned - base", justify="right")
        table.add_column("win rate", justify="right")
        for key in base:
            diff = comparison.get(key, {})
            table.add_row(
                key,
                _fmt(base[key]),
                _fmt(tuned.get(key, "")),
                _fmt(diff["difference"]) if diff else "",
                f"{diff['win_rate']:.2f}" if diff else "",
            )
        if "kl_from_base" in tuned:
            table.add_row("kl_from_base", "0", _fmt(tuned["kl_from_base"]), "", "")
        console.print(table)

"""Before/after evaluation: the base model and a tuned one on the same held-out prompts.

Both models sample with the same settings and the same seed (common random numbers), so their
difference is the tuning and not the dice. Per model: mean and 95% confidence interval of every
judge and of the reward model, raw toxicity, response length, EOS rate, distinct-1/2, the
deflection rate (share of completions that are assistant boilerplate instead of content, see
:func:`rlhfkit.judges.is_deflection`) and the fluency perplexity under an independent scorer
(:mod:`rlhfkit.evaluation.fluency`); per tuned model: win rate over the base (ties count half), the
paired difference with its interval, the sequence-level KL from the base estimated on the tuned
samples, and a green/red verdict against :data:`VERDICT_BOUNDS`.

Every model (base, tuned runs, reward model, fluency scorer) runs on one device; sampled ids stay
there, and only numbers leave it (``tolist``). ``settings`` records the device and dtype, since a GPU
or bf16 samples other completions than the CPU in fp32 with the same seed.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.console import progress_bar
from rlhfkit.data import Prompt, prompt_text, write_jsonl, write_text_atomic
from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluation.fluency import SCORER, Nll, completion_nll, corpus_ppl
from rlhfkit.generation import BatchJournal, SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.judges import distinct_n, is_deflection, load_judge, toxicity
from rlhfkit.models import final_hidden, load_causal_lm, load_tokenizer, model_device, model_dtype
from rlhfkit.reward import load_reward_model, score_texts
from rlhfkit.rl.roles import response_logprobs

Z95 = 1.959963984540054
LOWER_IS_BETTER = {"toxicity"}

VERDICT_BOUNDS: dict[str, float] = {
    "kl_from_base": 3.0,  # at most: mean KL from the base, nats per response
    "distinct_2_ratio": 0.90,  # at least: distinct-2 tuned / base (skipped when the base's is 0)
    "deflection_rate_increase": 0.10,  # at most: deflection rate tuned - base
    "eos_rate_ratio": 0.5,  # at least: EOS rate tuned / base (skipped when the base's is 0)
    "fluency_ppl_ratio": 1.25,  # at most: fluency perplexity tuned / base
}
"""The bounds a tuned model must keep for a green verdict, besides a significant gain on the first
judge (the reward model's score when no judge is given). Change a number here and every verdict,
metrics.json and the report follow."""


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
        stem = folder.name.replace(".", "_") or "tuned"  # peft adapter names cannot hold a dot
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names[name] = folder
    return names


def tuned_models(
    model: torch.nn.Module, run_dirs: dict[str, Path]
) -> tuple[dict[str, tuple[torch.nn.Module, Callable[[], AbstractContextManager]]], torch.nn.Module, Callable]:
    """Each tuned model with the context that activates it; the base module and its context.

    LoRA runs (``adapter/``) all load onto ``model`` as named peft adapters, so one copy of the
    weights serves every run; the base is that wrapper with adapters off (peft puts each adapter on
    its base layer's device). A full fine-tune (``model/``) is a model of its own, loaded on
    ``model``'s device in its dtype.
    """
    device, dtype = model_device(model), model_dtype(model)
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
            tuned[name] = (load_causal_lm(str(folder / "model"), dtype, device), nullcontext)
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
    journal: Path | None = None,
    identity: dict | None = None,
) -> list[Samples]:
    """One completion per prompt, in batches; returns the batches (ids kept for log-probs).

    ``journal``: each finished batch (its response tokens and the random state after it) goes to
    this file as it ends; run again after a kill with the same ``identity``, the journaled batches
    are read back and sampling goes on from the saved random state, so the result equals a straight
    run's exactly (see :class:`rlhfkit.generation.BatchJournal`).
    """
    torch.manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    device = model_device(model)
    log = BatchJournal(journal, "rlhfkit eval", encoded, params, batch_size, seed, identity, model)
    out = []
    for b, entry in enumerate(log.done):  # batches a killed run finished: rebuilt from their tokens
        q_ids, q_mask = left_pad(encoded[b * batch_size : (b + 1) * batch_size], pad, device=device)
        responses = torch.tensor(entry["responses"], dtype=torch.long, device=device)
        lengths = torch.tensor(entry["lengths"], device=device)
        mask = (torch.arange(responses.shape[1], device=device)[None, :] < lengths[:, None]).long()
        out.append(
            Samples(
                entry["texts"],
                torch.cat([q_ids, responses], 1),
                torch.cat([q_mask, mask], 1),
                q_ids.shape[1],
                entry["lengths"],
                entry["ended"],
            )
        )
        if on_batch is not None:
            on_batch(len(entry["texts"]))
    with log:
        for start in range(len(log.done) * batch_size, len(encoded), batch_size):
            q_ids, q_mask = left_pad(encoded[start : start + batch_size], pad, device=device)
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
            log.append(
                {
                    "batch": start // batch_size,
                    "texts": batch.texts,
                    "responses": batch.responses.tolist(),
                    "lengths": batch.lengths.tolist(),
                    "ended": batch.ended.tolist(),
                }
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


def _score_fluency(
    scorer_name: str | None,
    base: str,
    base_tokenizer,
    base_model: torch.nn.Module,
    base_view: Callable[[], AbstractContextManager],
    prompts: Sequence[Prompt],
    texts: dict[str, list[str]],
) -> tuple[dict[str, list[Nll]], dict]:
    """NLL of every completion under the scorer (the base model when the scorer does not load), on
    the base model's device and in its dtype."""
    if not scorer_name:
        return {}, {}
    started = time.perf_counter()
    model, tokenizer, view, note = base_model, base_tokenizer, base_view, ""
    if scorer_name != base:
        device, dtype = model_device(base_model), model_dtype(base_model)
        try:
            tokenizer, model = load_tokenizer(scorer_name), load_causal_lm(scorer_name, dtype, device)
            view = nullcontext
        except Exception as exc:  # any failure to load falls back, and the report says why
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            model, tokenizer, note = base_model, base_tokenizer, f"{scorer_name} did not load ({reason})"
            scorer_name = base
    loaded = time.perf_counter()
    out: dict[str, list[Nll]] = {}
    progress = progress_bar("eval: fluency")
    with progress, view():
        task = progress.add_task("fluency", total=sum(len(t) for t in texts.values()), info=scorer_name)
        for key, completions in texts.items():
            out[key] = completion_nll(
                model, tokenizer, prompts, completions, on_batch=lambda n: progress.advance(task, n)
            )
    info = {
        "fluency_scorer": scorer_name if not note else f"{base} (base model; {note})",
        "fluency_scorer_model": scorer_name,
        "fluency_scorer_note": note,
        "fluency_seconds": {"load": round(loaded - started, 2), "score": round(time.perf_counter() - loaded, 2)},
    }
    return out, info


_BOUND_RULES: dict[str, tuple[bool, str, str]] = {
    # name: (the value must be at most the limit?, what is measured, why it may be skipped)
    "kl_from_base": (True, "KL from base (nats per response)", "not measured: greedy sampling"),
    "distinct_2_ratio": (False, "distinct-2 tuned/base", "base distinct-2 is 0"),
    "deflection_rate_increase": (True, "deflection rate tuned - base", "not measured"),
    "eos_rate_ratio": (False, "EOS rate tuned/base", "base EOS rate is 0"),
    "fluency_ppl_ratio": (True, "fluency perplexity tuned/base", "fluency not scored"),
}


def _bound(name: str, value: float | None) -> dict:
    """One verdict bound: its measured value, limit, pass/fail (None when it could not be measured)."""
    limit, (at_most, words, skip) = VERDICT_BOUNDS[name], _BOUND_RULES[name]
    if value is None or not math.isfinite(value):
        return {"name": name, "value": None, "limit": limit, "pass": None, "text": f"{words}: skipped ({skip})"}
    ok = value <= limit if at_most else value >= limit
    sign = ("<=" if ok else ">") if at_most else (">=" if ok else "<")
    return {"name": name, "value": value, "limit": limit, "pass": ok, "text": f"{words} {value:.3g} {sign} {limit:g}"}


def verdict(base: dict, tuned: dict, comparison: dict, primary: str | None) -> dict:
    """Green when ``primary`` improved significantly at 95% and every bound of VERDICT_BOUNDS holds.

    Returns ``{"green", "color", "improved", "bounds", "broken", "summary"}``: ``improved`` says
    whether ``primary`` (lower-is-better metrics count a fall) improved with a 95% interval that
    excludes 0; each bound has its measured ``value``, ``limit``, ``pass`` (None when it could not
    be measured, e.g. the EOS ratio when the base never ends) and a ``text``; ``broken`` names the
    failed bounds and ``summary`` says in words what is green or what broke.
    """
    if primary is not None and primary in comparison:
        diff = comparison[primary]["difference"]
        better = diff["ci_high"] < 0 if primary in LOWER_IS_BETTER else diff["ci_low"] > 0
        change = ("fell" if primary in LOWER_IS_BETTER else "rose") if better else "did not improve"
        improved = {
            "metric": primary,
            "difference": diff["mean"],
            "ci_low": diff["ci_low"],
            "ci_high": diff["ci_high"],
            "pass": bool(better),
            "text": f"{primary} {change} significantly at 95% "
            f"({diff['mean']:+.3g}, CI {diff['ci_low']:+.3g} to {diff['ci_high']:+.3g})",
        }
    else:
        improved = {"metric": primary, "pass": False, "text": "no judge or reward-model score to compare"}

    def ratio(key: str) -> float | None:
        b, t = base.get(key), tuned.get(key)
        return t / b if isinstance(b, (int, float)) and isinstance(t, (int, float)) and b > 0 else None

    kl = tuned["kl_from_base"]["mean"] if "kl_from_base" in tuned else None
    deflection = tuned["deflection_rate"] - base["deflection_rate"] if "deflection_rate" in base else None
    measured = {
        "kl_from_base": kl,
        "distinct_2_ratio": ratio("distinct_2"),
        "deflection_rate_increase": deflection,
        "eos_rate_ratio": ratio("eos_rate"),
        "fluency_ppl_ratio": ratio("fluency_ppl"),
    }
    bounds = [_bound(name, measured[name]) for name in VERDICT_BOUNDS]
    broken = [b["name"] for b in bounds if b["pass"] is False]
    green = improved["pass"] and not broken
    problems = ([] if improved["pass"] else [improved["text"]]) + [b["text"] for b in bounds if b["pass"] is False]
    return {
        "green": green,
        "color": "green" if green else "red",
        "improved": improved,
        "bounds": bounds,
        "broken": broken,
        "summary": f"green: {improved['text']}; every bound holds" if green else "red: " + "; ".join(problems),
    }


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
    fluency_scorer: str | None = SCORER,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Compare the base model with each tuned run; writes metrics.json and samples.jsonl to ``out``.

    With one run, ``metrics["tuned"]``, ``metrics["comparison"]`` and ``metrics["verdict"]`` hold its
    numbers; with several, they map each run's name to them. Samples use the keys ``base_*`` and
    ``tuned_*`` (one run) or ``tuned_<name>_*`` (several).

    ``fluency_scorer`` names the model that scores fluency (default ``gemma3-270m``); when it does
    not load, the base model scores instead, ``fluency_scorer`` says so and
    ``settings.fluency_scorer_note`` says why. ``None`` skips fluency.

    Every model is loaded on ``device`` (``models.resolve_device`` turns ``--device`` into one) in
    ``dtype`` (the reward model stays fp32: its scores are compared with its training statistics).
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
    model = load_causal_lm(base, dtype, device)
    tuned, base_model, base_view = tuned_models(model, runs)
    single = len(tuned) == 1
    key_of = {name: "tuned" if single else f"tuned_{name}" for name in tuned}

    # Sampling is the long part: with ``out``, each model's batches are journaled as they finish, so
    # a killed evaluation run again onto the same ``out`` picks up where it stopped.
    journals = {
        key: Path(out) / f"{key}.samples.partial" if out is not None else None for key in ("base", *key_of.values())
    }
    batches: dict[str, list[Samples]] = {}
    progress = progress_bar("eval: sampling")
    with progress:
        task = progress.add_task("sample", total=len(prompts) * (1 + len(tuned)), info="base")

        def advance(n: int) -> None:
            progress.advance(task, n)

        with base_view():
            batches["base"] = sample(
                base_model, tokenizer, prompts, params, seed, batch_size, advance, journals["base"], {"model": base}
            )
        for name, (module, active) in tuned.items():
            progress.update(task, info=name)
            identity = {"model": base, "adapter": str(runs[name])}
            with active():
                batches[key_of[name]] = sample(
                    module, tokenizer, prompts, params, seed, batch_size, advance, journals[key_of[name]], identity
                )
    texts = {key: [t for b in bs for t in b.texts] for key, bs in batches.items()}

    plain = [prompt_text(p) for p in prompts]
    scores: dict[str, dict[str, list[float]]] = {key: {} for key in texts}
    judge_names = []
    for spec in judges:
        judge = load_judge(spec)
        judge_names.append(judge.name)
        for key, completions in texts.items():
            scores[key][judge.name] = judge(plain, completions)
            if judge.name == "nontoxic":
                scores[key]["toxicity"] = toxicity(completions)
    if reward_model is not None:
        rm, rm_tok, _ = load_reward_model(reward_model, device)
        for key, completions in texts.items():
            scores[key]["reward"] = score_texts(rm, rm_tok, list(prompts), completions)
        del rm
    fluency, scorer = _score_fluency(fluency_scorer, base, tokenizer, base_model, base_view, prompts, texts)
    deflected = {key: [is_deflection(t) for t in completions] for key, completions in texts.items()}

    per_model: dict[str, dict] = {}
    for key, bs in batches.items():
        lengths = [n for b in bs for n in b.lengths]
        ended = [e for b in bs for e in b.ended]
        per_model[key] = {metric: mean_ci(values) for metric, values in scores[key].items()}
        per_model[key]["response_length"] = mean_ci([float(n) for n in lengths])
        per_model[key]["eos_rate"] = sum(ended) / len(ended)
        per_model[key]["distinct_1"] = distinct_n(texts[key], 1)
        per_model[key]["distinct_2"] = distinct_n(texts[key], 2)
        per_model[key]["deflection_rate"] = sum(deflected[key]) / len(deflected[key])
        if fluency:
            per_model[key]["fluency_ppl"] = corpus_ppl(fluency[key])
            per_model[key]["fluency_scorer"] = scorer["fluency_scorer"]
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
    first = judge_names[0] if judge_names else ("reward" if reward_model is not None else None)
    verdicts = {name: verdict(per_model["base"], per_model[key_of[name]], comparisons[name], first) for name in tuned}

    metrics: dict = {"base": per_model["base"]}
    if tuned:
        if single:
            (name,) = tuned
            metrics["tuned"], metrics["comparison"] = per_model["tuned"], comparisons[name]
            metrics["verdict"] = verdicts[name]
        else:
            metrics["tuned"] = {name: per_model[key_of[name]] for name in tuned}
            metrics["comparison"] = comparisons
            metrics["verdict"] = verdicts
    metrics["settings"] = {
        "base": base,
        "adapters": {name: str(folder) for name, folder in runs.items()},
        "reward_model": str(reward_model) if reward_model else None,
        "judges": list(judges),
        "prompts": len(prompts),
        "seed": seed,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "device": str(model_device(model)),
        "dtype": str(dtype).removeprefix("torch."),
        **scorer,
    }
    rows = []
    for i, p in enumerate(prompts):
        row: dict = {"prompt": p}
        for key in texts:
            row[f"{key}_completion"] = texts[key][i]
            row.update({f"{key}_{metric}": round(v[i], 6) for metric, v in scores[key].items()})
            row[f"{key}_deflection"] = deflected[key][i]
            if fluency:
                ppl = fluency[key][i].ppl
                row[f"{key}_fluency_ppl"] = round(ppl, 4) if ppl is not None else None
        rows.append(row)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_jsonl(folder / "samples.jsonl", rows)
        for journal in journals.values():  # finished: the results above hold everything they did
            if journal is not None:
                journal.unlink(missing_ok=True)
    metrics["examples"] = _examples(rows, num_examples)
    return metrics


def tuned_entries(metrics: dict) -> list[tuple[str, dict, dict]]:
    """(name, tuned metrics, comparison) per tuned run, whether one run or several were evaluated."""
    if "tuned" not in metrics:
        return []
    if "response_length" in metrics["tuned"]:
        return [("tuned", metrics["tuned"], metrics["comparison"])]
    return [(name, m, metrics["comparison"][name]) for name, m in metrics["tuned"].items()]


def verdict_of(metrics: dict, name: str) -> dict | None:
    """The verdict of the tuned run ``name`` (``"tuned"`` when one run was evaluated), if any."""
    verdicts = metrics.get("verdict")
    if not verdicts:
        return None
    return verdicts if "green" in verdicts else verdicts.get(name)


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
            if isinstance(base[key], str):  # the fluency scorer's name, shown under the table
                continue
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
        if "fluency_scorer" in base:
            console.print(f"fluency_ppl scored by {base['fluency_scorer']}", markup=False)
        found = verdict_of(metrics, name)
        if found:
            console.print(f"verdict: {found['summary']}", style="green" if found["green"] else "red", markup=False)

"""Active selection of pairs to label, measured: the reward model's least-sure pairs first against random order.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184 \\
        .venv/bin/python bench/active_labeling.py            # 32 seeds to 400 labels; writes bench/RESULTS.md
    .venv/bin/python bench/active_labeling.py --quick        # 96 prompts, 2 seeds, up to 100 labels

A simulated labeling campaign. Candidates: 256 RealToxicityPrompts prefixes (``builtin:realtoxicity``,
shuffled with seed 0), 4 completions of 32 tokens each from the default model (SmolLM2-135M-Instruct,
temperature 1, ``rlhf generate``'s own code: the same 1024 completions ``rlhf demo --quick`` makes),
cached in ``bench/.cache/active_labeling/`` with their frozen features, so reruns skip both (about
4 minutes then; the first run adds about 6 minutes on an idle host, 18 with another job beside it). The
last 20% of the prompts are held out for evaluation (fixed for every seed); the other prompts' pairs are
the pool, imported into a real ``LabelStore`` (SQLite, as ``rlhf label serve``).

The labeler is the simulated one (``rlhfkit.labeling.simulated.judge_preferences``): the ``nontoxic``
judge with Bradley-Terry noise ``tau`` 0.05; a pair whose judge scores differ by less than 0.05 is
answered "tie" (as the demo drops near-ties), which spends a label and gives no training row. Each
seed draws one noisy answer per pair, so both orders get the same answer for the same pair.

The reward model in the loop is the **linear probe on frozen SmolLM2 features**: the mean of the
completion's final hidden states (``--pooling mean``), a linear head fitted by L-BFGS with L2 0.1
(``fit_linear_probe``), i.e. what ``rlhf reward train --lora-r 0 --head-init probe --epochs 0
--pooling mean`` fits, on every label exported so far. The features are computed once per
completion and reused every round; a check on a few pairs confirms that ``pair_uncertainty`` (the
shipped function, running the trunk) gives the same numbers as the probe over the cached features.

Per seed: 25 labels in the store's random order (the seed set, the same for both arms: the database
is copied after them), then rounds of 25 labels until each budget: fit the probe on
``export_rows(store)``; for the uncertain arm score every pool pair, ``store.set_uncertainty`` and
``store.set_select("uncertain")``; label the next 25 pairs exactly as the store serves them
(``next_pair`` + ``add_label``). The random arm serves by the store's ``shuffle_key`` (drawn with
``secrets`` at import, so a rerun draws other random orders: seeds are repeats, not replayable
streams). Reported after N labels: held-out pairwise accuracy against the judge's noise-free order
(pairs with a judge gap >= 0.05; the number ``eval_judge_accuracy`` reports) and against that
seed's noisy labels of the same pairs; mean and spread over seeds, and the paired difference with
a 95% t interval. With 16 seeds or fewer a single interval of the four was seen to exclude zero in
either direction and not hold at 32 seeds: read the intervals of a run together, not one by one.
Also reported: what each order picked (mean judge gap, near-ties answered tie, labels against the
judge's order) and the first pairs each order served after the seed set.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import BENCH, CACHE, GLIBC_TUNABLES, machine, write_results_section
from _floors import matmul_gflops

OUT = CACHE / "active_labeling"
ARMS = ("random", "uncertain")


@dataclass
class Settings:
    prompts: int = 256
    completions: int = 4
    max_new_tokens: int = 32
    held_out: float = 0.2
    judge: str = "nontoxic"
    tau: float = 0.05
    min_gap: float = 0.05
    seed_labels: int = 25
    batch: int = 25
    budgets: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400])
    seeds: int = 32
    l2: float = 0.1


def key_of(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Candidates and frozen features (cached)


def candidates_file(s: Settings, given: str | None) -> tuple[Path, dict]:
    """The candidates file, generated once with the default model (or ``--candidates``)."""
    if given:
        return Path(given), {"generated": "given"}
    from rlhfkit.cli import GenerateConfig, run_generate
    from rlhfkit.data import load_prompts, prompt_row, write_jsonl

    path = OUT / f"candidates-realtoxicity-{s.prompts}x{s.completions}-{s.max_new_tokens}tok.jsonl"
    meta_path = path.with_suffix(".meta.json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts("builtin:realtoxicity")
    random.Random(0).shuffle(prompts)  # grouped by category: mix them, as the demo does
    prompt_file = path.with_name(path.stem + ".prompts.jsonl")
    write_jsonl(prompt_file, [prompt_row(p) for p in prompts[: s.prompts]])
    rate = matmul_gflops()
    log(f"generating {s.prompts} x {s.completions} completions with smollm2-135m ({rate:.0f} GFLOP/s)")
    summary = run_generate(
        GenerateConfig(
            prompts=str(prompt_file),
            out=str(path),
            model="smollm2-135m",
            num_completions=s.completions,
            max_new_tokens=s.max_new_tokens,
            seed=0,
            device="cpu",
        )
    )
    meta = {"seconds": round(summary["seconds"], 1), "tokens_per_s": round(summary["tokens/s"], 1), "gflops": rate}
    meta_path.write_text(json.dumps(meta))
    return path, meta


@torch.no_grad()
def completion_features(model, tokenizer, items: list[tuple[Any, str]], batch_size: int = 32) -> torch.Tensor:
    """The pooled feature the reward head reads, per (prompt, completion): the same token rows as
    ``score_texts`` (``prompt + completion + EOS``, completion start marked), batched by length."""
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import right_pad
    from rlhfkit.reward import join_with_start

    eos = tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, [p for p, _ in items])
    joined = [
        join_with_start(p, tokenizer(c, add_special_tokens=False)["input_ids"], eos, 256)
        for p, (_, c) in zip(prompt_ids, items, strict=True)
    ]
    order = sorted(range(len(joined)), key=lambda i: len(joined[i][0]))
    out = torch.zeros(len(items), model.head.in_features)
    for n, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        ids, mask = right_pad([joined[i][0] for i in idx], tokenizer.pad_token_id)
        begin = torch.tensor([joined[i][1] for i in idx])
        out[idx] = model.features(ids, mask, begin).float()
        if n % 10 == 0:
            log(f"features: {min(start + batch_size, len(order))}/{len(order)}")
    return out


def frozen_model():
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.reward import RewardModel, new_head

    trunk = load_causal_lm("smollm2-135m")
    model = RewardModel(trunk, new_head(trunk.config.hidden_size, 0), pooling="mean").eval()
    return model, load_tokenizer("smollm2-135m")


def features_for(path: Path, items: list[tuple[Any, str]], loaded: list) -> tuple[torch.Tensor, dict]:
    """Features of every (prompt, completion), computed once per candidates file and kept on disk."""
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = OUT / f"features-{digest}.pt"
    if cache.exists():
        saved = torch.load(cache)
        if saved["keys"] == [[key_of(p), c] for p, c in items]:
            return saved["features"], saved["meta"]
    if not loaded:
        loaded.extend(frozen_model())
    rate = matmul_gflops()
    t0 = time.perf_counter()
    feats = completion_features(loaded[0], loaded[1], items)
    meta = {"seconds": round(time.perf_counter() - t0, 1), "sequences": len(items), "gflops": rate}
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save({"keys": [[key_of(p), c] for p, c in items], "features": feats, "meta": meta}, cache)
    return feats, meta


# ----------------------------------------------------------------------------------------------
# The campaign


@dataclass
class Data:
    pool: list  # CandidateRecord
    held: list
    index: dict[tuple[str, str], int]  # (prompt key, completion) -> feature row
    feats: torch.Tensor
    judge_scores: list[float]
    eval_win: torch.Tensor  # held-out pairs: the judge's better completion
    eval_lose: torch.Tensor


def build_data(candidates: list, s: Settings, feats: torch.Tensor, index: dict, judge) -> Data:
    from rlhfkit.data import prompt_text
    from rlhfkit.labeling.store import form_pairs

    n_held = round(len(candidates) * s.held_out)
    pool, held = candidates[:-n_held], candidates[-n_held:]
    items = sorted(index, key=index.get)
    by_prompt = {k: prompt for prompt in (r.prompt for r in candidates) for k in [key_of(prompt)]}
    scores = judge([prompt_text(by_prompt[k]) for k, _ in items], [c for _, c in items])
    win, lose = [], []
    for rec in held:
        k = key_of(rec.prompt)
        for i, j in form_pairs(rec.completions):
            a, b = index[k, rec.completions[i]], index[k, rec.completions[j]]
            if abs(scores[a] - scores[b]) >= s.min_gap:
                win.append(a if scores[a] > scores[b] else b)
                lose.append(b if scores[a] > scores[b] else a)
    return Data(pool, held, index, feats, scores, torch.tensor(win), torch.tensor(lose))


def copy_db(src: Path, dst: Path) -> None:
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b:
        a.backup(b)


def fit(store, data: Data, l2: float) -> tuple[torch.Tensor, int]:
    """The probe on every exported label (ties are not exported): weights and the rows it saw."""
    from rlhfkit.labeling.store import export_rows
    from rlhfkit.reward import fit_linear_probe

    rows, _ = export_rows(store)
    if not rows:
        return torch.zeros(data.feats.shape[1]), 0
    chosen = [data.index[key_of(r["prompt"]), r["chosen"]] for r in rows]
    rejected = [data.index[key_of(r["prompt"]), r["rejected"]] for r in rows]
    margin = torch.tensor([float(r.get("margin", 0.0)) for r in rows])
    return fit_linear_probe(data.feats[chosen], data.feats[rejected], margin, l2), len(rows)


def accuracy(w: torch.Tensor, data: Data, win: torch.Tensor, lose: torch.Tensor) -> float:
    from rlhfkit.reward import pairwise_accuracy

    scores = data.feats @ w
    return pairwise_accuracy(scores[win], scores[lose])


def segments(picks: list[dict], budgets: list[int]) -> list[dict]:
    """Per stretch between two budgets: how many labels, the share answered tie, the decided ones
    against the judge's order and the mean judge gap of the pairs picked there."""
    out = []
    for lo, hi in pairwise(sorted(budgets)):
        got = [p for p in picks if lo <= p["round"] < hi]
        decided = [p for p in got if p["choice"] != "tie"]
        out.append(
            {
                "from": lo,
                "to": hi,
                "labels": len(got),
                "ties": sum(p["choice"] == "tie" for p in got) / max(1, len(got)),
                "against": sum(p["against"] for p in decided) / max(1, len(decided)),
                "gap": statistics.mean(p["gap"] for p in got) if got else 0.0,
            }
        )
    return out


def least_sure(
    w: torch.Tensor, data: Data, to_score: list, first: list, second: list, gaps: list, labelled: set, min_gap: float
) -> dict:
    """What the probe is least sure about among the pool pairs not labelled yet: the share of near-ties
    (judge gap < ``min_gap``) in its 100 least-sure pairs against all of them, and the Spearman
    correlation of its uncertainty with the judge gap."""
    from scipy.stats import spearmanr

    from rlhfkit.reward import preference_uncertainty

    scores = (data.feats @ w).tolist()
    values = preference_uncertainty([scores[i] for i in first], [scores[j] for j in second])
    open_ = [k for k, row in enumerate(to_score) if row[0] not in labelled]
    order = sorted(open_, key=lambda k: values[k])
    near = [gaps[k] < min_gap for k in range(len(gaps))]
    return {
        "least_sure_100_ties": sum(near[k] for k in order[:100]) / max(1, len(order[:100])),
        "open_ties": sum(near[k] for k in open_) / max(1, len(open_)),
        "spearman_uncertainty_gap": float(spearmanr([values[k] for k in open_], [gaps[k] for k in open_])[0]),
    }


def run_seed(seed: int, s: Settings, data: Data, judge, tmp: Path, check) -> dict:
    from rlhfkit.labeling.simulated import judge_preferences
    from rlhfkit.labeling.store import LabelStore
    from rlhfkit.reward import preference_uncertainty

    # One noisy answer per pair for this seed (both arms see the same answer for the same pair).
    answers = {
        (key_of(r.prompt), frozenset((r.chosen, r.rejected))): r.chosen
        for r in judge_preferences(data.pool, judge, s.tau, seed=seed, min_gap=s.min_gap)
    }
    held_labels = judge_preferences(data.held, judge, s.tau, seed=10_000 + seed, min_gap=s.min_gap)
    noisy_win = torch.tensor([data.index[key_of(r.prompt), r.chosen] for r in held_labels])
    noisy_lose = torch.tensor([data.index[key_of(r.prompt), r.rejected] for r in held_labels])

    def label(store, who, n: int) -> list[dict]:
        picked = []
        for _ in range(n):
            view = store.next_pair(who)
            if view is None:
                break
            k = key_of(view.prompt)
            winner = answers.get((k, frozenset((view.a, view.b))))
            choice = "tie" if winner is None else "a" if winner == view.a else "b"
            store.add_label(who, view.pair_id, choice)
            sa, sb = data.judge_scores[data.index[k, view.a]], data.judge_scores[data.index[k, view.b]]
            against = choice != "tie" and (choice == "a") != (sa > sb)
            picked.append({"choice": choice, "gap": abs(sa - sb), "view": view, "sa": sa, "sb": sb, "against": against})
        return picked

    base = tmp / f"seed{seed}.db"
    store = LabelStore(base)
    store.import_candidates(data.pool)
    token = store.add_labeler("judge")
    who = store.labeler_for_token(token)
    store.set_select("random")
    seed_ids = {p["view"].pair_id for p in label(store, who, s.seed_labels)}

    # The all-labels reference: the probe on every pool pair's noisy label (not through the store).
    every = judge_preferences(data.pool, judge, s.tau, seed=seed, min_gap=s.min_gap)
    from rlhfkit.reward import fit_linear_probe

    w_all = fit_linear_probe(
        data.feats[[data.index[key_of(r.prompt), r.chosen] for r in every]],
        data.feats[[data.index[key_of(r.prompt), r.rejected] for r in every]],
        None,
        s.l2,
    )
    out: dict[str, Any] = {
        "seed": seed,
        "all": {
            "labels": len(every),
            "judge_acc": accuracy(w_all, data, data.eval_win, data.eval_lose),
            "label_acc": accuracy(w_all, data, noisy_win, noisy_lose),
        },
    }
    for arm in ARMS:
        t_arm = time.perf_counter()
        db = tmp / f"seed{seed}-{arm}.db"
        copy_db(base, db)
        store = LabelStore(db)
        who = store.labeler_for_token(token)
        store.set_select(arm)
        to_score = store.pairs_to_score()
        first = [data.index[key_of(p), a] for _, p, a, _ in to_score]
        second = [data.index[key_of(p), b] for _, p, _, b in to_score]
        gaps = [abs(data.judge_scores[i] - data.judge_scores[j]) for i, j in zip(first, second, strict=True)]
        done, picks, rows, fit_s = s.seed_labels, [], [], 0.0
        labelled = set(seed_ids)
        for budget in sorted(s.budgets):
            while done < budget:
                t0 = time.perf_counter()
                w, _ = fit(store, data, s.l2)
                fit_s += time.perf_counter() - t0
                if arm == "uncertain":
                    scores = (data.feats @ w).tolist()
                    values = preference_uncertainty([scores[i] for i in first], [scores[j] for j in second])
                    store.set_uncertainty({pid: u for (pid, *_), u in zip(to_score, values, strict=True)})
                    if check is not None:
                        check(w, to_score[:12], values[:12])
                        check = None
                got = label(store, who, min(s.batch, budget - done))
                for p in got:
                    p["round"] = done
                picks.extend(got)
                labelled.update(p["view"].pair_id for p in got)
                done += len(got)
                if not got:
                    break
            w, n_rows = fit(store, data, s.l2)
            rows.append(
                {
                    "labels": done,
                    "train_rows": n_rows,
                    "judge_acc": accuracy(w, data, data.eval_win, data.eval_lose),
                    "label_acc": accuracy(w, data, noisy_win, noisy_lose),
                }
            )
            if arm == "uncertain":
                rows[-1].update(least_sure(w, data, to_score, first, second, gaps, labelled, s.min_gap))
        decided = [p for p in picks if p["choice"] != "tie"]
        out[arm] = {
            "curve": rows,
            "seconds": round(time.perf_counter() - t_arm, 1),
            "fit_seconds": round(fit_s, 2),
            "picked": len(picks),
            "picked_mean_gap": statistics.mean(p["gap"] for p in picks) if picks else None,
            "picked_ties": sum(p["choice"] == "tie" for p in picks) / max(1, len(picks)),
            "picked_against_judge": sum(p["against"] for p in decided) / max(1, len(decided)),
            "segments": segments(picks, s.budgets),
            "first_picks": {
                after: [
                    {
                        "prompt": p["view"].prompt,
                        "a": p["view"].a,
                        "b": p["view"].b,
                        "score_a": round(p["sa"], 3),
                        "score_b": round(p["sb"], 3),
                        "choice": p["choice"],
                    }
                    for p in picks
                    if p["round"] == after
                ][:4]
                for after in sorted({s.seed_labels, sorted(s.budgets)[-2] if len(s.budgets) > 1 else s.seed_labels})
            },
        }
    return out


# ----------------------------------------------------------------------------------------------
# Report


def t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: list[dict], s: Settings, env: dict) -> str:
    n = len(results)
    lines = [
        f"Reward model in the loop: linear probe (L-BFGS, L2 {s.l2}) on frozen SmolLM2-135M-Instruct features "
        "(mean of the completion's final states), refitted every "
        f"{s.batch} labels. {n} seeds; mean ± sd over seeds; the difference is paired per seed (95% t interval).",
        "",
        "| labels N | random: judge-order acc | uncertain: judge-order acc | uncertain - random | "
        "random: noisy-label acc | uncertain: noisy-label acc | training rows (random / uncertain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, budget in enumerate(sorted(s.budgets)):
        acc = {arm: [r[arm]["curve"][i]["judge_acc"] for r in results] for arm in ARMS}
        lab = {arm: [r[arm]["curve"][i]["label_acc"] for r in results] for arm in ARMS}
        rows = {arm: statistics.mean(r[arm]["curve"][i]["train_rows"] for r in results) for arm in ARMS}
        diff = [u - r for u, r in zip(acc["uncertain"], acc["random"], strict=True)]
        if n > 1 and statistics.stdev(diff) > 0:
            half = t95(n) * statistics.stdev(diff) / n**0.5
            m = statistics.mean(diff)
            d = f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"
        else:
            d = f"{statistics.mean(diff):+.3f}"
        lines.append(
            f"| {budget} | {mean_sd(acc['random'])} | {mean_sd(acc['uncertain'])} | {d} | "
            f"{mean_sd(lab['random'])} | {mean_sd(lab['uncertain'])} | {rows['random']:.0f} / {rows['uncertain']:.0f} |"
        )
    every = [r["all"] for r in results]
    lines.append(
        f"| all {statistics.mean(e['labels'] for e in every):.0f} decided pool labels (reference) | "
        f"{mean_sd([e['judge_acc'] for e in every])} | | | {mean_sd([e['label_acc'] for e in every])} | | |"
    )
    lines += [
        "",
        "What each order picked, per stretch of labels (mean over seeds):",
        "",
        "| order | labels | mean judge gap of the picked pairs | answered tie (judge gap < "
        f"{s.min_gap}) | decided labels against the judge's order |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for i, seg in enumerate(results[0][arm]["segments"]):
            segs = [r[arm]["segments"][i] for r in results]
            gap = statistics.mean(g["gap"] for g in segs)
            ties = statistics.mean(g["ties"] for g in segs)
            flips = statistics.mean(g["against"] for g in segs)
            lines.append(f"| {arm} | {seg['from'] + 1}-{seg['to']} | {gap:.3f} | {ties:.0%} | {flips:.0%} |")
        gap = statistics.mean(r[arm]["picked_mean_gap"] for r in results)
        ties = statistics.mean(r[arm]["picked_ties"] for r in results)
        flips = statistics.mean(r[arm]["picked_against_judge"] for r in results)
        lines.append(f"| {arm} | all after the seed set | {gap:.3f} | {ties:.0%} | {flips:.0%} |")
    lines += [
        "",
        "What the uncertain arm's probe is least sure about, among the pool pairs not labelled yet (mean over seeds):",
        "",
        f"| labels N | near-ties (judge gap < {s.min_gap}) in its 100 least-sure pairs | near-ties in all of them | "
        "Spearman(its sureness abs(P - 0.5), judge gap) |",
        "|---|---|---|---|",
    ]
    for i, budget in enumerate(sorted(s.budgets)):
        curve = [r["uncertain"]["curve"][i] for r in results]
        least = statistics.mean(c["least_sure_100_ties"] for c in curve)
        pool = statistics.mean(c["open_ties"] for c in curve)
        rho = statistics.mean(c["spearman_uncertainty_gap"] for c in curve)
        lines.append(f"| {budget} | {least:.0%} | {pool:.0%} | {rho:+.2f} |")
    lines += [
        "",
        f"Held-out: {env['held_prompts']} prompts, {env['eval_pairs']} pairs with a judge gap >= {s.min_gap}; "
        f"pool: {env['pool_prompts']} prompts, {env['pool_pairs']} pairs in the store. "
        f"fp32 matmul (2048^3, best of 5): {env['gflops_start']:.0f} GFLOP/s before, {env['gflops_end']:.0f} after. "
        f"Wall: generation {env['generate']}, frozen features {env['features']}, campaign "
        f"{env['campaign_seconds']:.0f} s ({statistics.mean(r['random']['seconds'] for r in results):.1f} s "
        f"random / {statistics.mean(r['uncertain']['seconds'] for r in results):.1f} s uncertain per seed, "
        "store transactions and probe fits included), whole script "
        f"{env['total_seconds']:.0f} s. Machine: {env['cores']} cores ({env['cpu']}), torch {env['torch']}.",
    ]
    return "\n".join(lines)


def samples(results: list[dict]) -> str:
    out = []
    for after in results[0][ARMS[0]]["first_picks"]:
        for arm in ARMS:
            out.append(f"### the first pairs served after {after} labels, {arm} order (seed {results[0]['seed']})\n")
            for p in results[0][arm]["first_picks"][after]:
                out.append(f"- prompt: {p['prompt']!r}")
                out.append(f"  - A ({p['score_a']}): {p['a']!r}")
                out.append(f"  - B ({p['score_b']}): {p['b']!r}")
                out.append(f"  - labeler: {p['choice']}")
            out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96 prompts, 2 seeds, budgets 25 50 100")
    parser.add_argument("--seeds", type=int, help="repeats (default 32, quick 2)")
    parser.add_argument("--budgets", type=int, nargs="+", help="label counts to report (default 25 50 100 200 400)")
    parser.add_argument("--candidates", help="use this candidates file instead of generating one")
    args = parser.parse_args()
    started = time.perf_counter()
    s = Settings()
    if args.quick:
        s.prompts, s.seeds, s.budgets = 96, 2, [25, 50, 100]
    if args.seeds:
        s.seeds = args.seeds
    if args.budgets:
        s.budgets = sorted(args.budgets)
    if min(s.budgets) < s.seed_labels:
        raise SystemExit(f"budgets start at the seed set's {s.seed_labels} labels")

    from rlhfkit.data import load_candidates
    from rlhfkit.judges import load_judge
    from rlhfkit.labeling.store import form_pairs
    from rlhfkit.reward import pair_uncertainty

    gflops_start = matmul_gflops()
    path, gen_meta = candidates_file(s, args.candidates)
    candidates = load_candidates(path)
    index: dict[tuple[str, str], int] = {}
    items: list[tuple[Any, str]] = []
    for rec in candidates:
        for text in rec.completions:
            if (key_of(rec.prompt), text) not in index:
                index[key_of(rec.prompt), text] = len(items)
                items.append((rec.prompt, text))
    loaded: list = []
    feats, feat_meta = features_for(path, items, loaded)
    judge = load_judge(s.judge)
    data = build_data(candidates, s, feats, index, judge)

    def check(w: torch.Tensor, rows: list, expected: list[float]) -> None:
        """The shipped ``pair_uncertainty`` (a real forward through the trunk) against the cached features."""
        if not loaded:
            loaded.extend(frozen_model())
        model, tok = loaded
        with torch.no_grad():
            model.head.weight.copy_(w[None])
            model.head.bias.zero_()
        got = pair_uncertainty(model, tok, [(p, a, b) for _, p, a, b in rows])
        worst = max(abs(g - e) for g, e in zip(got, expected, strict=True))
        log(f"check: pair_uncertainty vs cached features on {len(rows)} pairs: max |diff| {worst:.2e}")
        if worst > 1e-3:
            raise SystemExit(f"pair_uncertainty and the cached probe disagree by {worst}")

    results = []
    t_campaign = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="active-labeling-") as tmp:
        for seed in range(s.seeds):
            t0 = time.perf_counter()
            results.append(run_seed(seed, s, data, judge, Path(tmp), check if seed == 0 else None))
            last = {arm: results[-1][arm]["curve"][-1]["judge_acc"] for arm in ARMS}
            log(
                f"seed {seed}: {time.perf_counter() - t0:.0f} s; at {s.budgets[-1]} labels judge-order acc "
                f"random {last['random']:.3f}, uncertain {last['uncertain']:.3f}"
            )
    campaign_seconds = time.perf_counter() - t_campaign
    pool_pairs = sum(len(form_pairs(r.completions)) for r in data.pool)
    info = machine()
    import importlib.metadata as md

    gen = gen_meta.get("seconds")
    env = {
        "held_prompts": len(data.held),
        "pool_prompts": len(data.pool),
        "pool_pairs": pool_pairs,
        "eval_pairs": len(data.eval_win),
        "gflops_start": gflops_start,
        "gflops_end": matmul_gflops(),
        "generate": f"{gen:.0f} s (when the cache was made, {gen_meta['gflops']:.0f} GFLOP/s)" if gen else "given file",
        "features": f"{feat_meta['seconds']:.0f} s for {feat_meta['sequences']} completions "
        f"(when the cache was made, {feat_meta['gflops']:.0f} GFLOP/s)",
        "campaign_seconds": campaign_seconds,
        "total_seconds": time.perf_counter() - started,
        "torch": md.version("torch"),
        **info,
    }
    table = report(results, s, env)
    print(table)
    print()
    print(samples(results))
    OUT.mkdir(parents=True, exist_ok=True)
    name = "results-quick.json" if args.quick else "results.json"
    (OUT / name).write_text(json.dumps({"settings": s.__dict__, "env": env, "results": results}, default=str))
    if not args.quick and not args.seeds and not args.budgets and not args.candidates:
        command = f"GLIBC_TUNABLES={GLIBC_TUNABLES} .venv/bin/python bench/active_labeling.py"
        body = f"Measured {time.strftime('%Y-%m-%d')}: `{command}`.\n\n{table}\n"
        title = "Active selection of pairs to label (`bench/active_labeling.py`)"
        write_results_section(BENCH / "RESULTS.md", "active_labeling", title, body)


if __name__ == "__main__":
    main()

"""Agreement between labelers and a position-bias check, for ``rlhf label stats`` and the admin page.

Labels are compared in each pair's own order (which completion won, or tie), never as shown: A/B
sides are drawn at random per pair, so "A" means different completions on different pairs. Skips
are not judgements and take no part in agreement.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters over the same items; None when chance agreement is 1 (undefined)."""
    if len(x) != len(y):
        raise ValueError(f"raters labelled different numbers of items ({len(x)} vs {len(y)})")
    n = len(x)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(x, y, strict=True)) / n
    cx, cy = Counter(x), Counter(y)
    expected = sum(cx[k] * cy[k] for k in cx) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def _item_agreement(counts: Counter[str]) -> float:
    """Share of agreeing rater pairs on one item (Fleiss' P_i)."""
    n = sum(counts.values())
    return (sum(c * c for c in counts.values()) - n) / (n * (n - 1))


def raw_agreement(items: Iterable[Counter[str]]) -> float | None:
    """Mean over items (with >= 2 ratings) of the share of rater pairs that agree."""
    shares = [_item_agreement(c) for c in items if sum(c.values()) >= 2]
    return sum(shares) / len(shares) if shares else None


def fleiss_kappa(items: Iterable[Counter[str]]) -> float | None:
    """Fleiss' kappa over items given as category counts; items with fewer than 2 ratings are skipped.

    With the same number of raters on every item this is Fleiss (1971); with varying numbers it is
    the usual generalisation (per-item agreement P_i over each item's own rater pairs, category
    shares pooled over all ratings). None when chance agreement is 1 (one category only).
    """
    usable = [c for c in items if sum(c.values()) >= 2]
    if not usable:
        return None
    p_bar = sum(_item_agreement(c) for c in usable) / len(usable)
    totals: Counter[str] = Counter()
    for c in usable:
        totals.update(c)
    ratings = sum(totals.values())
    p_e = sum((v / ratings) ** 2 for v in totals.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def _log_binom_pmf(k: int, n: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (log space: fine for large n)."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    logs = [_log_binom_pmf(i, n) for i in range(m + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; sane at 0 and n, unlike the normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def position_bias(choices: Iterable[str]) -> dict[str, Any]:
    """How often the left completion (A) wins among A/B decisions; about 0.5 when sides don't matter."""
    counts = Counter(c for c in choices if c in ("a", "b"))
    n, left = counts["a"] + counts["b"], counts["a"]
    low, high = wilson_interval(left, n)
    return {
        "decided": n,
        "left_wins": left,
        "left_win_rate": left / n if n else None,
        "ci_low": low if n else None,
        "ci_high": high if n else None,
        "p_value": binomial_two_sided_p(left, n) if n else None,
    }


FAST_WORDS_PER_MINUTE = 1000.0
"""A labeler whose median task goes faster than this is flagged: skimming runs at about 700 words a
minute, so faster than 1000 means not reading the prompt and the completions at all."""
ONE_SIDE_SHARE = 0.9
"""A labeler who picks the same side (A, or the one shown higher) in this share of decisions is flagged."""
MIN_FLAG_TASKS = 10
"""Flags need this many timed tasks (or A/B decisions): fewer say nothing about a labeler."""


def _words(text: str) -> int:
    return len(text.split())


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def reading_speeds(labels: Sequence[Any]) -> dict[str, list[float]]:
    """Per labeler, words per minute of each timed task (a pair, or a whole ranking): the words of
    the prompt and every completion shown, over the seconds from showing it to the answer."""
    from rlhfkit.data import prompt_text

    tasks: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in labels:
        if r.seconds is None:
            continue
        key = (r.labeler, ("r", r.ranking_id) if r.ranking_id is not None else ("l", r.label_id))
        task = tasks.setdefault(key, {"seconds": r.seconds, "prompt": prompt_text(r.prompt), "texts": {}})
        task["texts"].update({r.first: None, r.second: None})
    speeds: dict[str, list[float]] = defaultdict(list)
    for (name, _), task in tasks.items():
        words = _words(task["prompt"]) + sum(_words(t) for t in task["texts"])
        speeds[name].append(60.0 * words / max(task["seconds"], 0.05))
    return speeds


def labeler_quality(
    labels: Sequence[Any], gold_labels: Sequence[Any] = (), judge: str | None = None, names: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per labeler (those in ``names`` and every one with a label): gold accuracy, agreement and
    Cohen's kappa with the others' majority on shared pairs, agreement with the judge, median words
    per minute, side preference, and flags. A labeler without labels gets zeros and Nones."""
    from rlhfkit.labeling.store import gold_accuracy, majority

    outcomes: dict[int, dict[str, str]] = defaultdict(dict)  # pair -> labeler -> decided outcome
    for r in labels:
        if r.outcome != "skip":
            outcomes[r.pair_id][r.labeler] = r.outcome
    gold = gold_accuracy(gold_labels)
    speeds = reading_speeds(labels)
    names = sorted({r.labeler for r in labels} | set(gold) | set(names))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine, others = [], []
        for votes in outcomes.values():
            if name not in votes:
                continue
            winner, _ = majority([v for who, v in votes.items() if who != name])
            if winner is not None:
                mine.append(votes[name])
                others.append(winner)
        judged = [
            r.outcome == r.judge_outcome
            for r in labels
            if r.labeler == name and r.outcome in ("first", "second") and r.judge_outcome in ("first", "second")
        ]
        sides = [r.choice for r in labels if r.labeler == name and r.choice in ("a", "b")]
        speed = _median(speeds.get(name, []))
        flags = []
        if speed is not None and len(speeds[name]) >= MIN_FLAG_TASKS and speed > FAST_WORDS_PER_MINUTE:
            flags.append(f"faster than reading: median {speed:.0f} words/min over {len(speeds[name])} tasks")
        if len(sides) >= MIN_FLAG_TASKS:
            left = sides.count("a") / len(sides)
            if max(left, 1 - left) >= ONE_SIDE_SHARE:
                side = "A (left or higher)" if left >= 0.5 else "B (right or lower)"
                flags.append(f"picks {side} in {max(left, 1 - left):.0%} of {len(sides)} decisions")
        accuracy = gold.get(name, {})
        out[name] = {
            "gold_answered": accuracy.get("answered", 0),
            "gold_correct": accuracy.get("correct", 0),
            "gold_accuracy": accuracy.get("accuracy"),
            "shared_with_others": len(mine),
            "agreement_with_others": sum(a == b for a, b in zip(mine, others, strict=True)) / len(mine)
            if mine
            else None,
            "kappa_with_others": cohen_kappa(mine, others) if mine else None,
            "judge_pairs": len(judged) if judge else 0,
            "judge_agreement": sum(judged) / len(judged) if judge and judged else None,
            "median_words_per_minute": speed,
            "left_share": sides.count("a") / len(sides) if sides else None,
            "flags": flags,
        }
    return out


def summarize(
    labels: Sequence[Any],
    *,
    total_pairs: int,
    overlap: int,
    labelers: Sequence[str] = (),
    revoked: Iterable[str] = (),
    gold_labels: Sequence[Any] = (),
    judge: str | None = None,
    mode: str = "pair",
) -> dict[str, Any]:
    """Progress, labels per labeler with their quality checks, agreement on shared pairs and position bias.

    ``labels`` are live labels with ``pair_id``, ``labeler``, ``choice`` (a/b/tie/skip as shown),
    ``outcome`` (first/second/tie/skip in the pair's own order), ``created_at``, and the optional
    ``strength``, ``seconds``, ``ranking_id`` and ``judge_outcome``; ``gold_labels`` the same for gold
    pairs (with ``gold``, the right outcome).
    """
    revoked = set(revoked)
    by_choice = Counter(r.choice for r in labels)
    per_labeler: dict[str, Counter[str]] = {name: Counter() for name in labelers}
    last: dict[str, str] = {}
    decided: dict[int, dict[str, str]] = defaultdict(dict)  # pair -> labeler -> outcome
    for r in labels:
        per_labeler.setdefault(r.labeler, Counter())[r.choice] += 1
        last[r.labeler] = max(last.get(r.labeler, ""), r.created_at)
        if r.outcome != "skip":
            decided[r.pair_id][r.labeler] = r.outcome

    shared = {pid: votes for pid, votes in decided.items() if len(votes) >= 2}
    items = [Counter(votes.values()) for votes in shared.values()]
    cohen = []
    for x, y in combinations(sorted(per_labeler), 2):
        both = [(v[x], v[y]) for v in shared.values() if x in v and y in v]
        if both:
            xs, ys = zip(*both, strict=True)
            cohen.append(
                {
                    "labelers": [x, y],
                    "shared": len(both),
                    "agreement": sum(a == b for a, b in both) / len(both),
                    "kappa": cohen_kappa(xs, ys),
                }
            )
    kappas = [c["kappa"] for c in cohen if c["kappa"] is not None]
    complete = sum(len(v) >= overlap for v in decided.values())
    quality = labeler_quality(labels, gold_labels, judge, names=per_labeler)
    by_strength = Counter(r.strength for r in labels if r.strength)
    return {
        "mode": mode,
        "pairs": total_pairs,
        "overlap": overlap,
        "labels": len(labels),
        "rankings": len({r.ranking_id for r in labels if r.ranking_id is not None}),
        "by_choice": {c: by_choice[c] for c in ("a", "b", "tie", "skip")},
        "by_strength": {s: by_strength[s] for s in ("much", "slightly")},
        "judge": judge,
        "gold_labels": sum(1 for r in gold_labels if r.outcome != "skip"),
        "pairs_labelled": len(decided),
        "pairs_complete": complete,
        "progress": complete / total_pairs if total_pairs else None,
        "labelers": [
            {
                "name": name,
                "labels": sum(counts.values()),
                **{c: counts[c] for c in ("a", "b", "tie", "skip")},
                "revoked": name in revoked,
                "last_label_at": last.get(name),
                **quality[name],
            }
            for name, counts in per_labeler.items()
        ],
        "agreement": {
            "shared_pairs": len(shared),
            "raw": raw_agreement(items),
            "fleiss_kappa": fleiss_kappa(items),
            "mean_cohen_kappa": sum(kappas) / len(kappas) if kappas else None,
            "cohen": cohen,
        },
        "position_bias": position_bias(r.choice for r in labels),
    }

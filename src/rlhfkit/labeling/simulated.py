"""Simulated labeler: a judge plays the human, with Bradley-Terry noise so labels look like real ones.

Real labelers disagree on close calls; preferring a over b with probability sigmoid((s_a - s_b) / tau)
reproduces that, and tau sets how noisy the labels are (tau -> 0 is a deterministic argmax).
"""

from __future__ import annotations

import math
import random
from typing import Any

from rlhfkit.data import CandidateRecord, PreferenceRecord, prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import Judge
from rlhfkit.labeling.store import form_pairs

PAIRINGS = ("all", "adjacent")


def _sigmoid(x: float) -> float:
    """Overflow-safe logistic; x may be +-inf when tau is tiny."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def judge_preferences(
    candidates: list[CandidateRecord],
    judge: Judge,
    tau: float = 0.1,
    seed: int = 0,
    pairs: str = "all",
    min_gap: float = 0.0,
) -> list[PreferenceRecord]:
    """Label every pair of completions per prompt with the judge; same inputs and seed, same labels.

    Pairs whose judge scores differ by less than ``min_gap`` are ties, left out as a person's
    "tie" would be: they carry no preference, only noise.
    """
    if not tau > 0:
        raise RlhfkitError(f"tau must be > 0 (got {tau}); smaller tau means less label noise")
    if pairs not in PAIRINGS:
        raise RlhfkitError(f"pairs must be one of {', '.join(PAIRINGS)} (got {pairs!r})")

    plan = [(record, form_pairs(record.completions, adjacent=pairs != "all")) for record in candidates]
    plan = [(record, record_pairs) for record, record_pairs in plan if record_pairs]

    # One batched judge call over every completion that takes part in a pair.
    prompts: list[str] = []
    texts: list[str] = []
    offsets: list[int] = []
    for record, _ in plan:
        offsets.append(len(texts))
        prompts.extend([prompt_text(record.prompt)] * len(record.completions))
        texts.extend(record.completions)
    scores = judge(prompts, texts) if texts else []

    rng = random.Random(seed)
    prefs: list[PreferenceRecord] = []
    for (record, record_pairs), offset in zip(plan, offsets, strict=True):
        for i, j in record_pairs:
            s_i, s_j = scores[offset + i], scores[offset + j]
            if abs(s_i - s_j) < min_gap:
                continue
            a_wins = rng.random() < _sigmoid((s_i - s_j) / tau)
            (chosen, s_c), (rejected, s_r) = (
                ((record.completions[i], s_i), (record.completions[j], s_j))
                if a_wins
                else ((record.completions[j], s_j), (record.completions[i], s_i))
            )
            extra: dict[str, Any] = dict(record.extra)
            if record.model is not None:
                extra.setdefault("model", record.model)
            extra.update(
                labeler=f"judge:{judge.name}",
                score_chosen=round(s_c, 6),
                score_rejected=round(s_r, 6),
                tau=float(tau),
            )
            prefs.append(PreferenceRecord(prompt=record.prompt, chosen=chosen, rejected=rejected, extra=extra))
    return prefs


def label_summary(prefs: list[PreferenceRecord]) -> dict[str, Any]:
    """How often labels follow the judge, and by how much: a check on how noisy tau made them.

    Records without judge scores (e.g. human labels) count towards ``count`` only.
    """
    gaps = [
        float(p.extra["score_chosen"]) - float(p.extra["score_rejected"])
        for p in prefs
        if "score_chosen" in p.extra and "score_rejected" in p.extra
    ]
    if not gaps:
        return {"count": len(prefs), "agreement": None, "mean_score_gap": None, "mean_abs_score_gap": None}
    return {
        "count": len(prefs),
        "agreement": sum(g > 0 for g in gaps) / len(gaps),
        "mean_score_gap": sum(gaps) / len(gaps),
        "mean_abs_score_gap": sum(abs(g) for g in gaps) / len(gaps),
    }

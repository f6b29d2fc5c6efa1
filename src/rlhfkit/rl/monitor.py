"""The reward-hacking monitor: an independent judge on fixed held-out prompts, and detectors of the
failure modes RL users report most, read off the metric log.

``Monitor`` samples the same held-out batch with the same dice every time it runs and scores it with
a judge that is not the reward. Each detector is a pure function of the rows a trainer writes to
``metrics.jsonl`` (one dict per step; monitor keys only on the steps the monitor ran), so they can
be tested on synthetic curves and re-run on any finished run. They return an :class:`Alert` or ``None``:

- ``reward_up_monitor_down``: over the last ``window`` monitor evaluations the training reward rose
  while the independent judge fell by at least ``drop`` (the policy games the reward model);
- ``length_runaway``: mean response length over the last ``window`` steps left
  [first / ratio, first * ratio] of the first ``window`` steps (rambling to the limit, or empty answers);
- ``kl_runaway``: mean KL over the last ``window`` steps passed ``bound``, or fell below ``-1``
  (negative KL means the sampled tokens and the scored distribution disagree: a sampling bug);
- ``kl_without_reward``: over the last ``window`` steps the KL rose by at least ``kl_rise`` nats
  (and by a quarter) against the ``window`` steps before, while the penalised score (what PPO is
  paid) did not rise beyond its noise: the policy is drifting from the base for nothing;
- ``diversity_collapse``: distinct-2 of the monitor's completions (or of the rollouts when no
  monitor runs) fell below ``bound``, or below ``ratio`` times its value at the start (the same
  answer for every prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data import load_prompts, prompt_text
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.judges import distinct_n, load_judge

NEGATIVE_KL = -1.0
"""Mean sequence KL below this is not noise: the estimator or the sampling is broken."""


@dataclass(frozen=True)
class Alert:
    kind: str
    step: int
    message: str


def slope(values: Sequence[float]) -> float:
    """Least-squares slope per index: the trend of a short, noisy curve."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def monitor_points(rows: Sequence[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, mean training reward since the previous evaluation, monitor score) per evaluation.

    Averaging the reward between evaluations smooths the per-batch noise of a 16-prompt rollout.
    """
    points, since = [], []
    for row in rows:
        if "reward_mean" in row:
            since.append(row["reward_mean"])
        if "monitor_score" in row and since:
            points.append((row["step"], _mean(since), row["monitor_score"]))
            since = []
    return points


def reward_up_monitor_down(rows: Sequence[dict[str, Any]], window: int, drop: float) -> Alert | None:
    points = monitor_points(rows)[-window:]
    if len(points) < max(2, window):
        return None
    rewards, monitor = [p[1] for p in points], [p[2] for p in points]
    fell = monitor[0] - monitor[-1]
    if rewards[-1] > rewards[0] and slope(rewards) > 0 and slope(monitor) < 0 and fell >= drop:
        return Alert(
            "reward_up_monitor_down",
            points[-1][0],
            f"reward rose {rewards[0]:+.3f} -> {rewards[-1]:+.3f} while the monitor fell "
            f"{monitor[0]:.3f} -> {monitor[-1]:.3f} over the last {len(points)} evaluations "
            "(the policy may be gaming the reward)",
        )
    return None


def length_runaway(rows: Sequence[dict[str, Any]], window: int, ratio: float) -> Alert | None:
    lengths = [r["response_length"] for r in rows if "response_length" in r]
    if len(lengths) < 2 * window:
        return None
    first, recent = _mean(lengths[:window]), _mean(lengths[-window:])
    if recent > first * ratio or recent * ratio < first:
        return Alert(
            "length_runaway",
            rows[-1]["step"],
            f"mean response length went {first:.1f} -> {recent:.1f} tokens (more than {ratio:g}x either way)",
        )
    return None


def kl_runaway(rows: Sequence[dict[str, Any]], window: int, bound: float) -> Alert | None:
    kls = [r["kl"] for r in rows if "kl" in r][-window:]
    if len(kls) < window:
        return None
    recent = _mean(kls)
    if recent > bound:
        message = f"mean KL over the last {window} steps is {recent:.2f} > {bound:g}"
        return Alert("kl_runaway", rows[-1]["step"], message)
    if recent < NEGATIVE_KL:
        return Alert(
            "negative_kl",
            rows[-1]["step"],
            f"mean KL over the last {window} steps is {recent:.2f} < 0: the sampled responses do not come from "
            "the distribution that is scored (sampling settings differ from the log-probabilities?)",
        )
    return None


def kl_without_reward(rows: Sequence[dict[str, Any]], window: int, kl_rise: float = 1.0) -> Alert | None:
    """KL climbing while the score PPO optimises stays flat (within two standard errors)."""
    points = [(r["kl"], r["score_penalized_mean"]) for r in rows if "kl" in r and "score_penalized_mean" in r]
    if len(points) < 2 * window:
        return None
    before, recent = points[-2 * window : -window], points[-window:]
    kl_before, kl_recent = _mean([p[0] for p in before]), _mean([p[0] for p in recent])
    score_before, score_recent = [p[1] for p in before], [p[1] for p in recent]
    noise = 2.0 * math.sqrt((_var(score_before) + _var(score_recent)) / window)
    risen = kl_recent - kl_before >= max(kl_rise, 0.25 * abs(kl_before))
    if risen and _mean(score_recent) - _mean(score_before) <= noise:
        return Alert(
            "kl_without_reward",
            rows[-1]["step"],
            f"KL rose {kl_before:.2f} -> {kl_recent:.2f} nats over the last {2 * window} steps while the "
            f"penalised score stayed flat ({_mean(score_before):+.3f} -> {_mean(score_recent):+.3f}): the policy "
            "drifts from the base without earning reward (strengthen the KL term: --target-kl or --kl-coef; "
            "GRPO: --beta)",
        )
    return None


def _var(values: Sequence[float]) -> float:
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)


def diversity_collapse(rows: Sequence[dict[str, Any]], window: int, bound: float, ratio: float) -> Alert | None:
    monitored = [r["monitor_distinct_2"] for r in rows if "monitor_distinct_2" in r]
    if monitored:
        first, value, source = monitored[0], monitored[-1], "the monitor's completions"
    else:
        rollouts = [r["distinct_2"] for r in rows if "distinct_2" in r]
        if len(rollouts) < window:
            return None
        first, value = _mean(rollouts[:window]), _mean(rollouts[-window:])
        source = f"rollouts (last {window} steps)"
    if value < bound or value < ratio * first:
        return Alert(
            "diversity_collapse",
            rows[-1]["step"],
            f"distinct-2 of {source} fell {first:.2f} -> {value:.2f} (bound {bound:g}, or {ratio:g}x the start): "
            "answers are turning into one",
        )
    return None


def detect(
    rows: Sequence[dict[str, Any]],
    window: int,
    monitor_drop: float,
    length_ratio: float,
    kl_bound: float,
    min_distinct_2: float,
    distinct_2_ratio: float = 0.5,
) -> list[Alert]:
    """Every detector on the log so far."""
    found = [
        reward_up_monitor_down(rows, window, monitor_drop),
        length_runaway(rows, window, length_ratio),
        kl_runaway(rows, window, kl_bound),
        kl_without_reward(rows, window),
        diversity_collapse(rows, window, min_distinct_2, distinct_2_ratio),
    ]
    return [a for a in found if a is not None]


class Monitor:
    """The independent judge on a fixed held-out batch, sampled with the same dice at every run."""

    def __init__(self, judge: str, prompts: str, num_prompts: int, tokenizer, max_prompt_tokens: int) -> None:
        self.judge = load_judge(judge)
        held = load_prompts(prompts)[:num_prompts]
        self.texts = [prompt_text(r.prompt) for r in held]
        self.queries = [ids[-max_prompt_tokens:] for ids in encode_prompts(tokenizer, [r.prompt for r in held])]
        self.tokenizer = tokenizer

    @torch.no_grad()
    def run(self, policy: torch.nn.Module, params: SamplingParams, batch_size: int, seed: int) -> dict[str, float]:
        policy.eval()
        texts: list[str] = []
        lengths: list[float] = []
        with torch.random.fork_rng():  # the training run's random stream stays untouched (resume)
            torch.manual_seed(seed + 1)
            for start in range(0, len(self.queries), batch_size):
                ids, mask = left_pad(self.queries[start : start + batch_size], self.tokenizer.pad_token_id)
                batch = sample_batch(policy, self.tokenizer, ids, mask, params)
                texts += batch.texts
                lengths += batch.lengths.float().tolist()
        scores = self.judge(self.texts, texts)
        return {
            "monitor_score": sum(scores) / len(scores),
            "monitor_distinct_2": distinct_n(texts, 2),
            "monitor_length": sum(lengths) / len(lengths),
        }

"""``report.html``: one self-contained page that says what tuning changed, read top to bottom.

Sections: the headline (per tuned model its green/red verdict first, with every bound's measured
value, then each score base vs tuned with its 95% interval, significant or not, win rate, and KL,
diversity, deflection rate, fluency perplexity with the scorer's name, length and EOS rate),
reward-hacking alerts raised during training, training curves from the run's ``metrics.jsonl``, the
reward-vs-KL frontier, score histograms, the samples with the biggest gains and losses, and a few
completions flagged as deflections. Plots are matplotlib PNGs, written to ``plots/`` and embedded in the page as data
URIs, so the one file can be mailed or attached to a ticket. Every model output is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data import prompt_text, write_text_atomic
from rlhfkit.evaluation import (
    LOWER_IS_BETTER,
    VERDICT_BOUNDS,
    gains_and_losses,
    primary_metric,
    tuned_entries,
    verdict_of,
)
from rlhfkit.judges import deflection_match
from rlhfkit.rundir import read_metrics

ALERT_TEXT = {
    "reward_up_monitor_down": "reward rose while the independent monitor fell (reward hacking)",
    "length_runaway": "response length ran away from its starting level",
    "kl_runaway": "KL from the reference ran away",
    "negative_kl": "KL went negative (sampling and scoring disagree)",
    "kl_without_reward": "KL kept rising while the penalised reward stayed flat (drift that buys nothing)",
    "diversity_collapse": "diversity collapsed (distinct-2 under its bound)",
}

LABELS = {
    "reward": "reward model score",
    "nontoxic": "nontoxic judge",
    "toxicity": "toxicity P(toxic)",
    "sentiment": "sentiment judge",
    "clean": "clean judge",
}

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.35em 0.5em; vertical-align: top; text-align: left; }
th { background: #f5f5f5; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 13px; }
.good { color: #11772c; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; } .flat { color: #666; }
.alert { background: #fff4e5; border-left: 4px solid #e08a00; padding: 0.5em 0.8em; margin: 0.4em 0; }
.muted { color: #666; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
.verdict { padding: 0.6em 0.9em; margin: 0.5em 0; border-radius: 4px; font-size: 1.1em; }
.verdict.green { background: #e6f4ea; border-left: 6px solid #11772c; }
.verdict.red { background: #fce8e6; border-left: 6px solid #b3261e; }
"""


def _label(metric: str) -> str:
    return LABELS.get(metric, f"{metric} judge")


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _verdict(metric: str, diff: dict[str, float]) -> tuple[str, str]:
    """(css class, words) for a paired difference: better/worse only when the 95% interval excludes 0."""
    lower_better = metric in LOWER_IS_BETTER
    if diff["ci_low"] > 0 or diff["ci_high"] < 0:
        better = (diff["mean"] < 0) if lower_better else (diff["mean"] > 0)
        return ("good", "better, significant at 95%") if better else ("bad", "worse, significant at 95%")
    return "flat", "no significant change"


def first_alerts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The step at which each alert kind was first raised."""
    seen: dict[str, int] = {}
    for row in rows:
        for kind in row.get("alerts", []):
            seen.setdefault(kind, row["step"])
    return seen


# ----------------------------------------------------------------------------------------------
# Plots


def _moving(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training(logs: dict[str, list[dict]], path: Path) -> bool:
    """Per step: reward, monitor, KL and its coefficient, entropy, length and diversity (online RL);
    loss, implicit-reward margin, chosen/rejected log-probs and held-out KL (DPO)."""
    import matplotlib.pyplot as plt

    panels = [
        ("reward_mean", "reward (batch mean)"),
        ("monitor_score", "monitor judge (held-out)"),
        ("kl", "KL from reference (nats / response)"),
        ("entropy", "entropy (nats / token)"),
        ("response_length", "response length (tokens)"),
        ("distinct_2", "distinct-2 of rollouts"),
        ("loss", "DPO loss"),
        ("margin", "implicit reward margin (chosen - rejected)"),
        ("logps_chosen", "log-prob of chosen (falling with rejected: a known DPO failure)"),
        ("logps_rejected", "log-prob of rejected"),
        ("monitor_kl", "KL from reference on held-out prompts"),
    ]
    present = [(k, t) for k, t in panels if any(k in r for rows in logs.values() for r in rows)]
    if not present:
        return False
    cols = 3
    nrows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 3.4 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        for name, rows in logs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, values = zip(*pts, strict=True)
            marker = "o" if key == "monitor_score" else None
            line = ax.plot(steps, values, alpha=0.35 if marker is None else 0.9, marker=marker, label=name)[0]
            if marker is None and len(values) >= 5:
                ax.plot(steps, _moving(list(values), 5), color=line.get_color(), label=f"{name} (5-step mean)")
            if key == "kl" and any("kl_coef" in r for r in rows):
                twin = ax.twinx()
                coef = [(r["step"], r["kl_coef"]) for r in rows if "kl_coef" in r]
                twin.plot(*zip(*coef, strict=True), color="gray", linestyle=":", label="KL coefficient")
                twin.set_ylabel("KL coefficient", color="gray")
            for kind, step in first_alerts(rows).items():
                ax.axvline(step, color="#e08a00", linestyle="--", linewidth=1)
                ax.annotate(kind, (step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", color="#e08a00")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(logs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_frontier(logs: dict[str, list[dict]], path: Path) -> bool:
    """Reward (and monitor) against KL: how much score each nat of drift bought."""
    import matplotlib.pyplot as plt

    has_monitor = any("monitor_score" in r for rows in logs.values() for r in rows)
    if not any("kl" in r and "reward_mean" in r for rows in logs.values() for r in rows):
        return False  # no online RL run among them (a DPO run has no sampled reward)
    fig, axes = plt.subplots(1, 2 if has_monitor else 1, figsize=(12 if has_monitor else 6.5, 4.2), squeeze=False)
    for name, rows in logs.items():
        rows = [r for r in rows if "kl" in r and "reward_mean" in r]
        if not rows:
            continue
        kl = _moving([r["kl"] for r in rows], 5)
        reward = _moving([r["reward_mean"] for r in rows], 5)
        points = axes[0][0].scatter(kl, reward, c=[r["step"] for r in rows], cmap="viridis", s=14)
        axes[0][0].plot(kl, reward, alpha=0.3, label=name)
        if has_monitor:
            monitored = [(kl[i], r["monitor_score"]) for i, r in enumerate(rows) if "monitor_score" in r]
            if monitored:
                axes[0][1].plot(*zip(*monitored, strict=True), marker="o", label=name)
    fig.colorbar(points, ax=axes[0][0], label="step")
    axes[0][0].set_xlabel("KL from reference (nats / response, 5-step mean)")
    axes[0][0].set_ylabel("reward (5-step mean)")
    axes[0][0].set_title("reward vs KL (training)", fontsize=10)
    axes[0][0].grid(alpha=0.3)
    if has_monitor:
        axes[0][1].set_xlabel("KL from reference (nats / response)")
        axes[0][1].set_ylabel("monitor judge (held-out)")
        axes[0][1].set_title("independent monitor vs KL: where optimising the reward stops paying", fontsize=10)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_histograms(rows: list[dict], metrics: list[str], models: dict[str, str], path: Path) -> bool:
    """Per score, base vs each tuned model over the held-out prompts."""
    import matplotlib.pyplot as plt

    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = {label: [r[f"{key}_{metric}"] for r in rows] for key, label in models.items()}
        low = min(min(v) for v in values.values())
        high = max(max(v) for v in values.values())
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
        for label, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, label=label)
        ax.set_title(_label(metric), fontsize=10)
        ax.set_ylabel("prompts")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# The page


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _verdict_block(found: dict | None) -> str:
    """The verdict box: green or red, what broke in words, and a table of every bound."""
    if not found:
        return ""
    color = "green" if found["green"] else "red"
    rows = []
    for bound in found["bounds"]:
        state = {True: ("good", "pass"), False: ("bad", "FAIL"), None: ("flat", "skipped")}[bound["pass"]]
        value = "&ndash;" if bound["value"] is None else f"{bound['value']:.3g}"
        rows.append(
            f"<tr><td>{html.escape(bound['text'])}</td><td class='num'>{value}</td>"
            f"<td class='num'>{bound['limit']:g}</td><td class='{state[0]}'>{state[1]}</td></tr>"
        )
    improved = found["improved"]
    return (
        f"<div class='verdict {color}'><b>Verdict: {color.upper()}</b> &mdash; "
        f"{html.escape(found['summary'].split(': ', 1)[-1])}</div>"
        f"<table><tr><th>check</th><th>measured</th><th>bound</th><th></th></tr>"
        f"<tr><td>{html.escape(improved['text'])}</td><td class='num'></td><td class='num'>CI excludes 0</td>"
        f"<td class='{'good' if improved['pass'] else 'bad'}'>{'pass' if improved['pass'] else 'FAIL'}</td></tr>"
        f"{''.join(rows)}</table>"
    )


def _fluency_line(base: dict, tuned: dict) -> str:
    if base.get("fluency_ppl") is None or tuned.get("fluency_ppl") is None:
        return "fluency: not scored"
    b, t = base["fluency_ppl"], tuned["fluency_ppl"]
    worse = t > VERDICT_BOUNDS["fluency_ppl_ratio"] * b
    return (
        f"fluency (perplexity under <code>{html.escape(str(base.get('fluency_scorer', '?')))}</code>, lower reads "
        f"more naturally): {_num(b, 1)} &rarr; {_num(t, 1)}"
        + (f' <span class="bad">(more than {VERDICT_BOUNDS["fluency_ppl_ratio"]:g}x the base)</span>' if worse else "")
    )


def _headline(metrics: dict) -> str:
    base = metrics["base"]
    primary = primary_metric(metrics)
    parts = []
    for name, tuned, comparison in tuned_entries(metrics):
        title = "Tuned model" if name == "tuned" else f"Tuned run <code>{html.escape(name)}</code>"
        order = [primary] + [m for m in comparison if m != primary]
        rows = []
        for metric in order:
            if metric not in comparison:
                continue
            diff, b, t = comparison[metric]["difference"], base[metric], tuned[metric]
            css, words = _verdict(metric, diff)
            rows.append(
                f"<tr><td>{html.escape(_label(metric))}{' (lower is better)' if metric in LOWER_IS_BETTER else ''}"
                f'</td><td class="num">{_num(b["mean"])}</td><td class="num">{_num(t["mean"])}</td>'
                f'<td class="num">{diff["mean"]:+.3f} [{diff["ci_low"]:+.3f}, {diff["ci_high"]:+.3f}]</td>'
                f'<td class="num">{comparison[metric]["win_rate"]:.0%}</td><td class="{css}">{words}</td></tr>'
            )
        lead = ""
        if primary in comparison:
            diff = comparison[primary]["difference"]
            css, words = _verdict(primary, diff)
            lead = (
                f'<p class="{css}" style="font-size:1.15em">{html.escape(_label(primary))}: '
                f"{_num(base[primary]['mean'])} &rarr; {_num(tuned[primary]['mean'])} "
                f"({diff['mean']:+.3f}, 95% CI {diff['ci_low']:+.3f} to {diff['ci_high']:+.3f}): {words}; "
                f"the tuned model wins on {comparison[primary]['win_rate']:.0%} of prompts (ties count half).</p>"
            )
        drift = []
        if "kl_from_base" in tuned:
            kl = tuned["kl_from_base"]
            drift.append(
                f"KL from the base: <b>{_num(kl['mean'], 2)}</b> nats per response "
                f"(95% CI {_num(kl['ci_low'], 2)} to {_num(kl['ci_high'], 2)})"
            )
        d2b, d2t = base["distinct_2"], tuned["distinct_2"]
        fell = d2b > 0 and d2t < 0.75 * d2b
        drift.append(
            f"diversity (distinct-2): {_num(d2b, 2)} &rarr; {_num(d2t, 2)}"
            + (' <span class="bad">(fell by more than a quarter: answers grow alike)</span>' if fell else "")
        )
        if "deflection_rate" in base:
            bound = VERDICT_BOUNDS["deflection_rate_increase"]
            rose = tuned["deflection_rate"] - base["deflection_rate"] > bound
            drift.append(
                f"deflection rate (assistant boilerplate instead of content): {base['deflection_rate']:.0%} &rarr; "
                f"{tuned['deflection_rate']:.0%}"
                + (f' <span class="bad">(up by more than {bound * 100:g} points)</span>' if rose else "")
            )
        drift.append(_fluency_line(base, tuned))
        drift.append(
            f"response length: {_num(base['response_length']['mean'], 1)} &rarr; "
            f"{_num(tuned['response_length']['mean'], 1)} tokens; EOS rate {base['eos_rate']:.0%} &rarr; "
            f"{tuned['eos_rate']:.0%}"
        )
        parts.append(
            f"<h3>{title}</h3>{_verdict_block(verdict_of(metrics, name))}{lead}"
            "<table><tr><th>score</th><th>base</th><th>tuned</th>"
            f"<th>tuned &minus; base [95% CI]</th><th>tuned wins</th><th>change</th></tr>{''.join(rows)}</table>"
            f"<ul>{''.join(f'<li>{d}</li>' for d in drift)}</ul>"
        )
    if not parts:
        parts.append("<p>Only the base model was evaluated: no comparison.</p>")
    return "".join(parts)


def _alerts_section(logs: dict[str, list[dict]]) -> str:
    items = []
    for name, rows in logs.items():
        for kind, step in first_alerts(rows).items():
            text = ALERT_TEXT.get(kind, kind)
            items.append(f'<div class="alert"><b>{html.escape(name)}</b>, step {step}: {html.escape(text)}</div>')
    if not logs:
        return ""
    if not items:
        return "<p>No reward-hacking alert was raised during training.</p>"
    return "".join(items)


def _samples_table(rows: list[dict], model_key: str, metric: str, title: str) -> str:
    if not rows:
        return f"<p class='muted'>{html.escape(title)}: none.</p>"
    body = []
    for r in rows:
        b, t = r[f"base_{metric}"], r[f"{model_key}_{metric}"]
        body.append(
            f'<tr><td class="text">{html.escape(prompt_text(r["prompt"]))}</td>'
            f'<td class="text">{html.escape(r["base_completion"])}</td><td class="num">{b:.3f}</td>'
            f'<td class="text">{html.escape(r[f"{model_key}_completion"])}</td><td class="num">{t:.3f}</td></tr>'
        )
    return (
        f"<h3>{html.escape(title)}</h3><table><tr><th>prompt</th><th>base completion</th><th>score</th>"
        f"<th>tuned completion</th><th>score</th></tr>{''.join(body)}</table>"
    )


def _deflections_section(rows: list[dict], models: dict[str, str], n: int) -> str:
    """Up to ``n`` completions per model flagged as deflections, with the words that matched."""
    parts = []
    for key, label in models.items():
        flagged = [r for r in rows if r.get(f"{key}_deflection")]
        if not any(f"{key}_deflection" in r for r in rows):
            continue
        head = f"<h3>{html.escape(label)}: {len(flagged)} of {len(rows)} completions flagged</h3>"
        if not flagged:
            parts.append(head)
            continue
        body = []
        for r in flagged[:n]:
            found = deflection_match(r[f"{key}_completion"])
            kind = f"{found[0]} (&ldquo;{html.escape(found[1])}&rdquo;)" if found else ""
            body.append(
                f'<tr><td class="text">{html.escape(prompt_text(r["prompt"]))}</td>'
                f'<td class="text">{html.escape(r[f"{key}_completion"])}</td><td>{kind}</td></tr>'
            )
        parts.append(
            f"{head}<table><tr><th>prompt</th><th>completion</th><th>boilerplate found</th></tr>{''.join(body)}</table>"
        )
    return "".join(parts)


def write_report(out: str | Path, metrics: dict, rows: list[dict], runs: dict[str, Path], num_samples: int = 5) -> Path:
    """Write ``report.html`` and ``plots/*.png`` into ``out``; returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(out)
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    logs = {name: log for name, run in runs.items() if (log := read_metrics(run))}
    entries = tuned_entries(metrics)
    models = {"base": "base"} | {("tuned" if n == "tuned" else f"tuned_{n}"): n for n, _, _ in entries}
    scored = [k for k, v in metrics["base"].items() if isinstance(v, dict) and k != "response_length"]

    figures = []
    if plot_training(logs, plots / "training_curves.png"):
        figures.append(("Training curves", "training_curves.png", "Per training step; dashed lines mark alerts."))
    if plot_frontier(logs, plots / "reward_vs_kl.png"):
        figures.append(("Reward vs KL", "reward_vs_kl.png", "Each point is a step (5-step means)."))
    if plot_histograms(rows, scored, models, plots / "score_histograms.png"):
        figures.append(("Score distributions", "score_histograms.png", "Held-out prompts, base vs tuned."))

    settings = metrics.get("settings", {})
    primary = primary_metric(metrics) if scored else None
    samples = []
    for name, _, _ in entries:
        key = "tuned" if name == "tuned" else f"tuned_{name}"
        if primary is None:
            break
        gains, losses = gains_and_losses(rows, key, primary, num_samples)
        suffix = "" if name == "tuned" else f" ({name})"
        samples.append(_samples_table(gains, key, primary, f"Biggest gains by the {_label(primary)}{suffix}"))
        samples.append(_samples_table(losses, key, primary, f"Biggest losses by the {_label(primary)}{suffix}"))

    adapters = ", ".join(
        f"<code>{html.escape(n)}</code> = {html.escape(p)}" for n, p in settings.get("adapters", {}).items()
    )
    page = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>rlhfkit evaluation report</title><style>{CSS}</style></head><body>",
        "<h1>rlhfkit evaluation report</h1>",
        f"<p class='muted'>Base <code>{html.escape(str(settings.get('base', '?')))}</code>; "
        f"tuned: {adapters or 'none'}. "
        f"{settings.get('prompts', len(rows))} held-out prompts, one completion each, the same sampling seed for "
        f"every model (temperature {settings.get('temperature')}, at most {settings.get('max_new_tokens')} new "
        "tokens). Intervals are 95% normal-approximation intervals over prompts; differences are paired.</p>",
        "<h2>Headline</h2>",
        _headline(metrics),
    ]
    if logs:
        page += ["<h2>Reward-hacking alerts during training</h2>", _alerts_section(logs)]
    for title, name, caption in figures:
        page += [f"<h2>{title}</h2>", f"<p class='muted'>{caption}</p>", _img(plots / name, title)]
    if samples:
        page += ["<h2>Samples side by side</h2>", *samples]
    deflections = _deflections_section(rows, models, num_samples)
    if deflections:
        page += [
            "<h2>Deflections</h2>",
            "<p class='muted'>Completions that replace the content with assistant boilerplate (refusals, "
            "&ldquo;As an AI&rdquo;, &ldquo;I'm here to help&rdquo;), as <code>rlhfkit.judges.is_deflection</code> "
            "flags them.</p>",
            deflections,
        ]
    page.append("</body></html>")
    path = folder / "report.html"
    write_text_atomic(path, "\n".join(page))
    return path

"""``rlhf label serve | add-labeler | list-labelers | revoke | export | stats``: labeling by people.

One config dataclass per command (flags, YAML keys and ``--help`` come from it) and one run
function; ``register`` adds them all to the ``rlhf label`` group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rlhfkit.config import REQUIRED, config_command, option
from rlhfkit.console import print_table
from rlhfkit.errors import RlhfkitError

console = Console()


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# serve


@dataclass
class LabelServeConfig:
    """Options of ``rlhf label serve``."""

    db: str = option(REQUIRED, "SQLite database of the labeling project (created if missing).", required=True)
    candidates: str = option(
        "", "Candidates file from `rlhf generate` to import before serving; importing it again adds nothing twice."
    )
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = option(8000, "Port to listen on.")
    overlap: int = option(1, "Labelers per pair (K); a labeler never gets a pair twice. Agreement needs K >= 2.")
    admin_token: str = option(
        "", "Admin token for the admin page and /api/admin (default: generated and printed at first start)."
    )
    lease_minutes: float = option(
        30.0,
        "Minutes a shown but unlabelled pair stays reserved for its labeler before others may get it (0: for ever).",
    )
    guidelines: str = option(
        "",
        "Markdown file of the campaign's criteria: shown on the page (raw HTML is never rendered); each labeler "
        "acknowledges every new version before labeling; its sha256 goes with every label into the export. "
        "Empty: keep the stored guidelines.",
    )
    mode: str = option(
        "",
        "pair: pick the better of two completions (with how much better); rank: order all of a prompt's "
        "completions, exported as its K(K-1)/2 pairs. Empty: keep the stored mode (pair at first).",
    )
    select: str = option(
        "",
        "Order of new pairs: order (as imported), random, or uncertain (the --reward-model's least sure pairs "
        "first, |P(a > b) - 0.5| smallest, the rest at random). Empty: keep the stored order (order at first).",
    )
    reward_model: str = option("", "Reward model directory that scores every pair for --select uncertain.")
    gold: str = option(
        "",
        "Preference JSONL of gold pairs (known answers) mixed into each labeler's pairs; they measure labelers "
        "and are never exported.",
    )
    gold_rate: float = option(0.1, "Share of a labeler's new pairs that are gold pairs (while unseen ones remain).")
    judge: str = option(
        "",
        "Judge (built-in name, module:function or file.py:function) whose order each labeler's labels are "
        "compared with in the statistics; it scores every completion once at start.",
    )

    def __post_init__(self) -> None:
        if self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1 to 65535, got {self.port}")
        if self.lease_minutes < 0:
            raise ValueError(f"lease_minutes must be >= 0, got {self.lease_minutes}")
        if self.mode not in ("", "pair", "rank"):
            raise ValueError(f"mode must be pair or rank, got {self.mode!r}")
        if self.select not in ("", "order", "random", "uncertain"):
            raise ValueError(f"select must be order, random or uncertain, got {self.select!r}")
        if self.select == "uncertain" and not self.reward_model:
            raise ValueError("--select uncertain needs --reward-model DIR (the reward model that scores the pairs)")
        if self.reward_model and self.select != "uncertain":
            raise ValueError("--reward-model is only used with --select uncertain")
        if not 0.0 <= self.gold_rate < 1.0:
            raise ValueError(f"gold_rate must be in [0, 1), got {self.gold_rate}")


def prepare_serve(cfg: LabelServeConfig) -> dict[str, Any]:
    """Everything ``serve`` does before listening: import, overlap, admin token, a summary."""
    from rlhfkit.data import load_candidates
    from rlhfkit.labeling.store import MAX_RANK_COMPLETIONS, LabelStore, new_token

    store = LabelStore(cfg.db)
    summary: dict[str, Any] = {}
    if cfg.candidates:
        imported = store.import_candidates(load_candidates(cfg.candidates))
        summary.update(
            {
                "prompts added": imported.prompts_added,
                "completions added": imported.completions_added,
                "pairs added": imported.pairs_added,
            }
        )
        if imported.prompts_without_pairs:
            summary["prompts without a pair"] = imported.prompts_without_pairs
    counts = store.counts()
    if counts["pairs"] == 0:
        hint = "" if cfg.candidates else "; pass --candidates FILE"
        raise RlhfkitError(f"{cfg.db}: no pairs to label (every prompt needs two different completions){hint}")
    store.set_overlap(cfg.overlap)
    if (cfg.mode or store.mode) == "rank" and (cfg.gold or counts["gold_pairs"]):
        raise RlhfkitError("gold pairs are served in pair mode only (a gold 'ranking' of two would stand out)")
    if cfg.mode:
        store.set_mode(cfg.mode)
    if store.mode == "rank" and store.largest_ranking() > MAX_RANK_COMPLETIONS:
        raise RlhfkitError(
            f"a prompt has {store.largest_ranking()} completions to rank; at most {MAX_RANK_COMPLETIONS} "
            "fit one ranking (sample fewer, or use --mode pair)"
        )
    if cfg.guidelines:
        summary["guidelines sha256"] = store.set_guidelines(_read_text(cfg.guidelines))[:12]
    if cfg.gold:
        from rlhfkit.data import load_preferences

        summary["gold pairs added"] = store.import_gold(load_preferences(cfg.gold), source=cfg.gold)
    if store.counts()["gold_pairs"]:
        store.set_gold_rate(cfg.gold_rate)
        summary["gold rate"] = cfg.gold_rate
    if cfg.select:
        store.set_select(cfg.select)
    if cfg.reward_model:
        summary["pairs scored by the reward model"] = score_uncertainty(store, cfg.reward_model)
    if cfg.judge:
        summary[f"completions scored by {cfg.judge}"] = score_with_judge(store, cfg.judge)
    summary.update({"mode": store.mode, "select": store.select})
    admin_token = None
    if cfg.admin_token:
        store.set_admin_token(cfg.admin_token)
    elif not store.has_admin_token():
        admin_token = new_token()
        store.set_admin_token(admin_token)
    labelers = store.list_labelers()
    summary.update(
        {
            "prompts": counts["prompts"],
            "pairs": counts["pairs"],
            "overlap": cfg.overlap,
            "labelers": sum(1 for lb in labelers if lb["revoked_at"] is None),
            "labels": store.stats()["labels"],
        }
    )
    return {"store": store, "summary": summary, "new_admin_token": admin_token}


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RlhfkitError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RlhfkitError(f"{path}: cannot read it as UTF-8 text ({exc})") from None


def score_uncertainty(store: Any, reward_model: str) -> int:
    """Score every pair to label with a reward model: ``|P(first > second) - 0.5|`` for ``--select uncertain``.

    This command module is wiring, like ``cli``: it may call the reward stage; the store never does.
    """
    from rlhfkit.reward import reward_dir_uncertainty

    pairs = store.pairs_to_score()
    values = reward_dir_uncertainty(reward_model, [(prompt, a, b) for _, prompt, a, b in pairs])
    store.set_uncertainty({pair_id: value for (pair_id, *_), value in zip(pairs, values, strict=True)})
    return len(pairs)


def score_with_judge(store: Any, spec: str) -> int:
    """Score the completions the judge has not scored yet and store them; returns how many were scored."""
    from rlhfkit.data import prompt_text
    from rlhfkit.judges import load_judge

    judge = load_judge(spec)
    todo = store.completions_to_judge(judge.name)
    scores = judge([prompt_text(prompt) for _, prompt, _ in todo], [text for *_, text in todo]) if todo else []
    store.set_judge_scores(judge.name, {cid: score for (cid, *_), score in zip(todo, scores, strict=True)})
    return len(todo)


def _base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"


def run_label_serve(cfg: LabelServeConfig) -> None:
    from rlhfkit.labeling.server import create_app, serve

    prepared = prepare_serve(cfg)
    print_table("label serve", prepared["summary"])
    base = _base_url(cfg.host, cfg.port)
    if prepared["new_admin_token"]:
        _say(f"admin token (shown once, stored hashed): {prepared['new_admin_token']}")
        _say(f"admin page: {base}/admin#token={prepared['new_admin_token']}")
    else:
        _say(f"admin page: {base}/admin#token=ADMIN_TOKEN (set at first start or by --admin-token)")
    if prepared["summary"]["labelers"] == 0:
        _say(f"no labelers yet: rlhf label add-labeler --db {cfg.db} --name NAME --url {base}")
    _say(f"labeling page: {base}/ (each labeler opens the link add-labeler printed)")
    app = create_app(cfg.db, lease_seconds=cfg.lease_minutes * 60)
    serve(app, cfg.host, cfg.port)


# ----------------------------------------------------------------------------------------------
# add-labeler, list-labelers, revoke


@dataclass
class LabelAddLabelerConfig:
    """Options of ``rlhf label add-labeler``."""

    db: str = option(REQUIRED, "Labeling database (created if missing).", required=True)
    name: str = option(REQUIRED, "Labeler's name, unique (shown in exports as `labeler`).", required=True)
    url: str = option("http://127.0.0.1:8000", "Server address as the labeler reaches it, for the printed link.")
    new_token: bool = option(
        False, "Issue a new token for an existing labeler (the old one stops working; a revoked one is restored)."
    )


def run_label_add_labeler(cfg: LabelAddLabelerConfig) -> str:
    from rlhfkit.labeling.store import LabelStore

    store = LabelStore(cfg.db, create=not cfg.new_token)
    token = store.reissue_token(cfg.name) if cfg.new_token else store.add_labeler(cfg.name)
    _say(f"labeler: {cfg.name.strip()}")
    _say(f"token: {token}")
    _say(f"open: {cfg.url.rstrip('/')}/#token={token}")
    return token


@dataclass
class LabelListLabelersConfig:
    """Options of ``rlhf label list-labelers``."""

    db: str = option(REQUIRED, "Labeling database.", required=True)


def run_label_list_labelers(cfg: LabelListLabelersConfig) -> list[dict[str, Any]]:
    from rlhfkit.labeling.store import LabelStore

    labelers = LabelStore(cfg.db, create=False).list_labelers()
    table = Table(title="labelers")
    for column in ("name", "status", "labels", "created", "last label"):
        table.add_column(column, justify="right" if column == "labels" else "left")
    for lb in labelers:
        status = f"revoked {lb['revoked_at']}" if lb["revoked_at"] else "active"
        table.add_row(lb["name"], status, str(lb["labels"]), lb["created_at"], lb["last_label_at"] or "-")
    console.print(table)
    return labelers


@dataclass
class LabelRevokeConfig:
    """Options of ``rlhf label revoke``."""

    db: str = option(REQUIRED, "Labeling database.", required=True)
    name: str = option(REQUIRED, "Labeler whose token stops working now (their labels are kept).", required=True)


def run_label_revoke(cfg: LabelRevokeConfig) -> None:
    from rlhfkit.labeling.store import LabelStore

    LabelStore(cfg.db, create=False).revoke(cfg.name)
    _say(f"revoked {cfg.name}: the token no longer works; labels already given are kept")


# ----------------------------------------------------------------------------------------------
# export


@dataclass
class LabelExportConfig:
    """Options of ``rlhf label export``."""

    db: str = option(REQUIRED, "Labeling database.", required=True)
    out: str = option(REQUIRED, "Preference JSONL to write.", required=True)
    format: str = option("trl", "Row form: trl (prompt/chosen/rejected) or vertex (input_text/candidate_0/1/choice).")
    aggregate: str = option("none", "none: one row per label; majority: one row per pair, its labels' majority.")
    min_agreement: float = option(0.0, "Keep only pairs whose majority share of decided labels is at least this.")
    min_labels: int = option(1, "Keep only pairs with at least this many decided (a/b/tie) labels.")
    include_ties: bool = option(False, 'Also write ties (trl only; marked "tie": true, kept in the pair\'s order).')
    include_skips: bool = option(False, 'Also write skips (trl only, not with majority; marked "skip": true).')
    min_gold_accuracy: float | None = option(
        None, "Leave out every label of labelers whose gold-pair accuracy is below this (or who answered none)."
    )
    margin_much: float = option(1.0, "Bradley-Terry margin of a 'much better' label (Llama 2's scale: 1).")
    margin_slightly: float = option(1 / 3, "Bradley-Terry margin of a 'slightly better' label (Llama 2's scale: 1/3).")

    def __post_init__(self) -> None:
        if self.format not in ("trl", "vertex"):
            raise ValueError(f"format must be 'trl' or 'vertex', got {self.format!r}")
        if self.aggregate not in ("none", "majority"):
            raise ValueError(f"aggregate must be 'none' or 'majority', got {self.aggregate!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        if self.min_labels < 1:
            raise ValueError(f"min_labels must be >= 1, got {self.min_labels}")
        if self.min_gold_accuracy is not None and not 0.0 <= self.min_gold_accuracy <= 1.0:
            raise ValueError(f"min_gold_accuracy must be between 0 and 1, got {self.min_gold_accuracy}")
        if self.margin_much < 0 or self.margin_slightly < 0:
            raise ValueError("margins must be >= 0")


def run_label_export(cfg: LabelExportConfig) -> dict[str, Any]:
    from rlhfkit.data import write_jsonl
    from rlhfkit.labeling.store import LabelStore, export_rows

    store = LabelStore(cfg.db, create=False)
    rows, dropped = export_rows(
        store,
        cfg.format,
        include_ties=cfg.include_ties,
        include_skips=cfg.include_skips,
        aggregate=cfg.aggregate,
        min_agreement=cfg.min_agreement,
        min_labels=cfg.min_labels,
        min_gold_accuracy=cfg.min_gold_accuracy,
        margins={"much": cfg.margin_much, "slightly": cfg.margin_slightly},
    )
    left_out = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(dropped.items())) or "none"
    if not rows:
        raise RlhfkitError(f"{cfg.db}: nothing to export (left out: {left_out})")
    write_jsonl(cfg.out, rows)
    summary = {"rows": len(rows), "left out": left_out, "format": cfg.format, "written to": cfg.out}
    print_table("label export", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# stats


@dataclass
class LabelStatsConfig:
    """Options of ``rlhf label stats``."""

    db: str = option(REQUIRED, "Labeling database.", required=True)
    out: str = option("", "Also write the statistics as JSON to this file.")
    judge: str = option(
        "", "Judge to compare each labeler with (scores completions it has not scored yet; the scores are stored)."
    )


def _num(value: Any) -> Any:
    return "-" if value is None else value


def _share(value: float | None, count: int) -> str:
    return "-" if value is None else f"{value:.0%} of {count}"


def run_label_stats(cfg: LabelStatsConfig) -> dict[str, Any]:
    from rlhfkit.labeling.store import LabelStore

    store = LabelStore(cfg.db, create=False)
    if cfg.judge:
        score_with_judge(store, cfg.judge)
    stats = store.stats()
    by, strength = stats["by_choice"], stats["by_strength"]
    print_table(
        "progress",
        {
            "mode": stats["mode"],
            "pairs": stats["pairs"],
            "overlap": stats["overlap"],
            "labels": stats["labels"],
            "rankings": stats["rankings"],
            "A / B / tie / skip": f"{by['a']} / {by['b']} / {by['tie']} / {by['skip']}",
            "much / slightly better": f"{strength['much']} / {strength['slightly']}",
            "gold labels": stats["gold_labels"],
            "pairs labelled": stats["pairs_labelled"],
            "pairs complete": stats["pairs_complete"],
            "progress": _num(stats["progress"]),
        },
    )
    table = Table(title="labels per labeler")
    for column in ("labeler", "labels", "A", "B", "tie", "skip", "last label"):
        table.add_column(column, justify="left" if column in ("labeler", "last label") else "right")
    for lb in stats["labelers"]:
        name = lb["name"] + (" (revoked)" if lb["revoked"] else "")
        counts = [str(lb[k]) for k in ("labels", "a", "b", "tie", "skip")]
        table.add_row(name, *counts, lb["last_label_at"] or "-")
    console.print(table)
    judge = f"agree with {stats['judge']}" if stats["judge"] else "agree with judge"
    table = Table(title="labeler quality")
    for column in ("labeler", "gold right", "agree with others", "kappa with others", judge, "words/min", "A share"):
        table.add_column(column, justify="left" if column == "labeler" else "right")
    table.add_column("flags")
    for lb in stats["labelers"]:
        gold = f"{lb['gold_correct']}/{lb['gold_answered']}" if lb["gold_answered"] else "-"
        wpm = lb["median_words_per_minute"]
        table.add_row(
            lb["name"],
            gold,
            _share(lb["agreement_with_others"], lb["shared_with_others"]),
            "-" if lb["kappa_with_others"] is None else f"{lb['kappa_with_others']:.3f}",
            _share(lb["judge_agreement"], lb["judge_pairs"]),
            "-" if wpm is None else f"{wpm:.0f}",
            "-" if lb["left_share"] is None else f"{lb['left_share']:.0%}",
            "; ".join(lb["flags"]) or "-",
            style="bold red" if lb["flags"] else None,
        )
    console.print(table)
    agreement = stats["agreement"]
    print_table(
        "agreement on shared pairs",
        {
            "shared pairs": agreement["shared_pairs"],
            "raw agreement": _num(agreement["raw"]),
            "Fleiss' kappa": _num(agreement["fleiss_kappa"]),
            "mean Cohen's kappa": _num(agreement["mean_cohen_kappa"]),
            **{
                f"Cohen's kappa {c['labelers'][0]} / {c['labelers'][1]} ({c['shared']} pairs)": _num(c["kappa"])
                for c in agreement["cohen"]
            },
        },
    )
    bias = stats["position_bias"]
    print_table(
        "position bias (left = A)",
        {
            "A/B decisions": bias["decided"],
            "left wins": bias["left_wins"],
            "left win rate": _num(bias["left_win_rate"]),
            "95% interval": "-" if bias["ci_low"] is None else f"{bias['ci_low']:.3f} to {bias['ci_high']:.3f}",
            "p-value (fair coin)": _num(bias["p_value"]),
        },
    )
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        _say(f"wrote {cfg.out}")
    return stats


# ----------------------------------------------------------------------------------------------


def register(label_app: typer.Typer) -> None:
    """Add the people-labeling commands to the ``rlhf label`` group."""
    config_command(
        label_app,
        "serve",
        LabelServeConfig,
        run_label_serve,
        "Serve the labeling web page: import candidates, pair them, collect people's preferences.",
    )
    config_command(
        label_app,
        "add-labeler",
        LabelAddLabelerConfig,
        run_label_add_labeler,
        "Create a labeler and print their secret token and the link to open.",
    )
    config_command(
        label_app, "list-labelers", LabelListLabelersConfig, run_label_list_labelers, "List labelers and their labels."
    )
    config_command(
        label_app, "revoke", LabelRevokeConfig, run_label_revoke, "Revoke a labeler's token (their labels are kept)."
    )
    config_command(
        label_app,
        "export",
        LabelExportConfig,
        run_label_export,
        "Export people's labels as preference pairs (TRL or Vertex AI form).",
    )
    config_command(
        label_app,
        "stats",
        LabelStatsConfig,
        run_label_stats,
        "Labeling progress, labels per labeler, agreement (Cohen's/Fleiss' kappa) and position bias.",
    )

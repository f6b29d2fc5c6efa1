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

    def __post_init__(self) -> None:
        if self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1 to 65535, got {self.port}")
        if self.lease_minutes < 0:
            raise ValueError(f"lease_minutes must be >= 0, got {self.lease_minutes}")


def prepare_serve(cfg: LabelServeConfig) -> dict[str, Any]:
    """Everything ``serve`` does before listening: import, overlap, admin token, a summary."""
    from rlhfkit.data import load_candidates
    from rlhfkit.labeling.store import LabelStore, new_token

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

    def __post_init__(self) -> None:
        if self.format not in ("trl", "vertex"):
            raise ValueError(f"format must be 'trl' or 'vertex', got {self.format!r}")
        if self.aggregate not in ("none", "majority"):
            raise ValueError(f"aggregate must be 'none' or 'majority', got {self.aggregate!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        if self.min_labels < 1:
            raise ValueError(f"min_labels must be >= 1, got {self.min_labels}")


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


def _num(value: Any) -> Any:
    return "-" if value is None else value


def run_label_stats(cfg: LabelStatsConfig) -> dict[str, Any]:
    from rlhfkit.labeling.store import LabelStore

    stats = LabelStore(cfg.db, create=False).stats()
    by = stats["by_choice"]
    print_table(
        "progress",
        {
            "pairs": stats["pairs"],
            "overlap": stats["overlap"],
            "labels": stats["labels"],
            "A / B / tie / skip": f"{by['a']} / {by['b']} / {by['tie']} / {by['skip']}",
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

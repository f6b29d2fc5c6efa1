"""The labeling database: candidates, pairs, labelers, assignments and labels in one SQLite file.

Everything the web page and the ``rlhf label`` commands do goes through ``LabelStore``. Each write is
one ``BEGIN IMMEDIATE`` transaction on its own connection (WAL, ``synchronous=FULL``), so concurrent
requests serialise on SQLite's write lock, an accepted label is on disk before the HTTP reply, and a
SIGKILL loses nothing that was acknowledged. A partial unique index makes a doubled label impossible
whatever the caller does.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from rlhfkit.data import CandidateRecord, PreferenceRecord, Prompt, preference_row
from rlhfkit.errors import RlhfkitError

SCHEMA_VERSION = 1
CHOICES = ("a", "b", "tie", "skip")
DECIDED = ("a", "b", "tie")
MAX_NOTE_CHARS = 2000
MAX_NAME_CHARS = 64
MIN_ADMIN_TOKEN_CHARS = 16
NAME_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]+$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    prompt_key TEXT NOT NULL UNIQUE,          -- canonical JSON: the same prompt is imported once
    prompt_json TEXT NOT NULL,
    extra_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS completions (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    model TEXT,
    UNIQUE (prompt_id, text)
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    first_id INTEGER NOT NULL REFERENCES completions(id),
    second_id INTEGER NOT NULL REFERENCES completions(id),
    left_id INTEGER NOT NULL,                 -- the completion shown as A (left), drawn once at random
    UNIQUE (first_id, second_id),
    CHECK (first_id < second_id),
    CHECK (left_id IN (first_id, second_id))
);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,          -- sha256 of the token; the token itself is never stored
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS assignments (
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    assigned_at REAL NOT NULL,                -- unix seconds; an unlabelled assignment's lease starts here
    undo_seq INTEGER,                         -- set by undo: the most recently undone pair comes back first
    PRIMARY KEY (pair_id, labeler_id)         -- a labeler never gets the same pair twice
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL,
    labeler_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    left_id INTEGER NOT NULL,                 -- the completion shown as A when this label was given
    note TEXT,
    created_at TEXT NOT NULL,
    undone_at TEXT,
    FOREIGN KEY (pair_id, labeler_id) REFERENCES assignments(pair_id, labeler_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS labels_one_live ON labels(pair_id, labeler_id) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS labels_by_labeler ON labels(labeler_id, id);
CREATE INDEX IF NOT EXISTS pairs_by_prompt ON pairs(prompt_id);
"""


class NotAssignedError(RlhfkitError):
    """A label for a pair this labeler was never given (HTTP 409)."""


class AlreadyLabeledError(RlhfkitError):
    """A second, different label for a pair this labeler already labelled (HTTP 409; undo first)."""


class NothingToUndoError(RlhfkitError):
    """Undo with no live label left (HTTP 409)."""


@dataclass(frozen=True)
class Labeler:
    """An active labeler, as found from a token."""

    id: int
    name: str


@dataclass(frozen=True)
class PairView:
    """What one labeler is shown: A is the stored left completion, B the right one."""

    pair_id: int
    prompt: Prompt
    a: str
    b: str


@dataclass
class ImportSummary:
    """What an import added; a second import of the same file adds zeros."""

    prompts_added: int = 0
    completions_added: int = 0
    pairs_added: int = 0
    pairs_total: int = 0
    prompts_without_pairs: int = 0


@dataclass
class LabelRow:
    """One live label with what stats and export need, in the pair's original orientation."""

    label_id: int
    pair_id: int
    labeler: str
    choice: str  # as given: a (left) / b (right) / tie / skip
    outcome: str  # first / second / tie / skip: which of the pair's completions (by import order) won
    created_at: str
    note: str | None
    prompt: Prompt = field(repr=False)
    prompt_extra: dict[str, Any] = field(repr=False)
    first: str = field(repr=False)
    second: str = field(repr=False)
    first_model: str | None = field(repr=False)
    second_model: str | None = field(repr=False)


def now_iso() -> str:
    """UTC time with milliseconds, ``2025-01-31T12:00:00.123Z``: sortable and unambiguous."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_token(token: str) -> str:
    """Tokens are 256-bit random, so a plain SHA-256 is enough to make a stolen DB useless."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def form_pairs(texts: list[str], adjacent: bool = False) -> list[tuple[int, int]]:
    """Index pairs (i < j) worth asking about: every unordered pair whose texts differ.

    Empty completions are left out, and of texts equal after stripping whitespace only the first
    takes part: a preference between copies carries nothing (and preference files reject empty or
    identical texts), and a near-copy would only show the labeler the same comparison twice.
    ``adjacent``: only (0, 1), (2, 3), ... (disjoint pairs, for a cheaper simulated labeling).
    The one pairing rule of the project: the labeling page and the simulated labelers share it.
    """
    seen: set[str] = set()
    usable = []
    for i, text in enumerate(texts):
        key = text.strip()
        if key and key not in seen:
            seen.add(key)
            usable.append(i)
    if adjacent:
        kept = set(usable)
        return [(i, i + 1) for i in range(0, len(texts) - 1, 2) if i in kept and i + 1 in kept]
    return list(combinations(usable, 2))


class LabelStore:
    """All reads and writes of one labeling database file."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise RlhfkitError(f"{self.path}: no such labeling database (create it with `rlhf label serve`)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                # WAL lets readers run beside the one writer; the mode is stored in the file.
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise RlhfkitError(f"{self.path}: schema version {row[0]}, this rlhfkit reads {SCHEMA_VERSION}")
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            raise RlhfkitError(f"{self.path}: not a labeling database ({exc})") from exc

    # ------------------------------------------------------------------------------------------
    # Connections and transactions

    def _connect(self) -> sqlite3.Connection:
        """A fresh connection per operation: safe from any thread, nothing shared between requests."""
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 30000")
        con.execute("PRAGMA synchronous = FULL")  # an acknowledged label survives even power loss
        con.execute("PRAGMA foreign_keys = ON")
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front so check-then-write is atomic."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot across several queries."""
        con = self._connect()
        try:
            con.execute("BEGIN")
            yield con
            con.execute("COMMIT")
        finally:
            con.close()

    # ------------------------------------------------------------------------------------------
    # Settings

    def get_meta(self, key: str) -> str | None:
        with self._read() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as con:
            con.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)
            )

    @property
    def overlap(self) -> int:
        """Labelers per pair, as set by the latest ``serve --overlap``."""
        return int(self.get_meta("overlap") or 1)

    def set_overlap(self, overlap: int) -> None:
        if overlap < 1:
            raise RlhfkitError(f"overlap must be >= 1, got {overlap}")
        self.set_meta("overlap", str(overlap))

    def has_admin_token(self) -> bool:
        return self.get_meta("admin_token_hash") is not None

    def set_admin_token(self, token: str) -> None:
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise RlhfkitError(f"admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters")
        self.set_meta("admin_token_hash", hash_token(token))

    def is_admin_token(self, token: str) -> bool:
        stored = self.get_meta("admin_token_hash")
        return stored is not None and secrets.compare_digest(stored, hash_token(token))

    # ------------------------------------------------------------------------------------------
    # Import and pairing

    def import_candidates(self, records: Iterable[CandidateRecord]) -> ImportSummary:
        """Add prompts, completions and their pairs; anything already present is left as it is."""
        summary = ImportSummary()
        with self._write() as con:
            touched: set[int] = set()
            for record in records:
                key = _prompt_key(record.prompt)
                cur = con.execute(
                    "INSERT OR IGNORE INTO prompts (prompt_key, prompt_json, extra_json) VALUES (?, ?, ?)",
                    (key, json.dumps(record.prompt, ensure_ascii=False), json.dumps(record.extra, ensure_ascii=False)),
                )
                summary.prompts_added += cur.rowcount
                (prompt_id,) = con.execute("SELECT id FROM prompts WHERE prompt_key = ?", (key,)).fetchone()
                for text in record.completions:
                    cur = con.execute(
                        "INSERT OR IGNORE INTO completions (prompt_id, text, model) VALUES (?, ?, ?)",
                        (prompt_id, text, record.model),
                    )
                    summary.completions_added += cur.rowcount
                touched.add(prompt_id)
            for prompt_id in sorted(touched):
                rows = con.execute("SELECT id, text FROM completions WHERE prompt_id = ? ORDER BY id", (prompt_id,))
                ids, texts = zip(*rows.fetchall(), strict=True)
                pairs = form_pairs(list(texts))
                if not pairs:
                    summary.prompts_without_pairs += 1
                for i, j in pairs:
                    left = ids[i] if secrets.randbelow(2) == 0 else ids[j]
                    cur = con.execute(
                        "INSERT OR IGNORE INTO pairs (prompt_id, first_id, second_id, left_id) VALUES (?, ?, ?, ?)",
                        (prompt_id, ids[i], ids[j], left),
                    )
                    summary.pairs_added += cur.rowcount
            summary.pairs_total = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        return summary

    def counts(self) -> dict[str, int]:
        with self._read() as con:
            return {
                table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("prompts", "completions", "pairs")
            }

    # ------------------------------------------------------------------------------------------
    # Labelers

    def add_labeler(self, name: str) -> str:
        """Create a labeler; returns the token, which is shown once and only its hash is kept."""
        name = _check_name(name)
        token = new_token()
        with self._write() as con:
            row = con.execute("SELECT revoked_at FROM labelers WHERE name = ?", (name,)).fetchone()
            if row is not None:
                state = "revoked" if row[0] else "active"
                raise RlhfkitError(f"labeler {name!r} already exists ({state}); use --new-token to issue a new token")
            con.execute(
                "INSERT INTO labelers (name, token_hash, created_at) VALUES (?, ?, ?)",
                (name, hash_token(token), now_iso()),
            )
        return token

    def reissue_token(self, name: str) -> str:
        """A new token for an existing labeler (the old one stops working; a revoked labeler is restored).

        Keeping the same labeler keeps their history, so they still never see a pair twice.
        """
        token = new_token()
        with self._write() as con:
            cur = con.execute(
                "UPDATE labelers SET token_hash = ?, revoked_at = NULL WHERE name = ?", (hash_token(token), name)
            )
            if cur.rowcount == 0:
                raise RlhfkitError(f"no labeler named {name!r}")
        return token

    def revoke(self, name: str) -> None:
        """The token stops working at once; labels already given stay, unlabelled pairs go to others."""
        with self._write() as con:
            row = con.execute("SELECT revoked_at FROM labelers WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RlhfkitError(f"no labeler named {name!r}")
            if row[0] is not None:
                raise RlhfkitError(f"labeler {name!r} was already revoked at {row[0]}")
            con.execute("UPDATE labelers SET revoked_at = ? WHERE name = ?", (now_iso(), name))

    def labeler_for_token(self, token: str) -> Labeler | None:
        """The active labeler holding ``token``, or None (unknown or revoked)."""
        with self._read() as con:
            row = con.execute(
                "SELECT id, name FROM labelers WHERE token_hash = ? AND revoked_at IS NULL", (hash_token(token),)
            ).fetchone()
        return None if row is None else Labeler(row[0], row[1])

    def list_labelers(self) -> list[dict[str, Any]]:
        with self._read() as con:
            rows = con.execute(
                """
                SELECT lb.name, lb.created_at, lb.revoked_at,
                       (SELECT count(*) FROM labels l WHERE l.labeler_id = lb.id AND l.undone_at IS NULL),
                       (SELECT max(created_at) FROM labels l WHERE l.labeler_id = lb.id AND l.undone_at IS NULL)
                FROM labelers lb ORDER BY lb.id
                """
            ).fetchall()
        keys = ("name", "created_at", "revoked_at", "labels", "last_label_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # ------------------------------------------------------------------------------------------
    # Assignment

    def next_pair(self, labeler: Labeler, lease_seconds: float = 0.0) -> PairView | None:
        """The pair this labeler should label now, or None when nothing is left for them.

        Their own unlabelled assignment comes first (the most recently undone one before any other),
        so a reload or an undo shows the same pair. Otherwise a new pair is assigned: one not yet
        assigned to them, held by fewer than ``overlap`` labelers; partly labelled pairs first, so
        overlapping labels (and agreement numbers) arrive early. A pair counts as held by a labeler
        who gave it a decided label (skips free the slot) or who holds an unexpired assignment
        (``lease_seconds`` > 0 lets pairs abandoned by their labeler go to someone else).
        """
        now = time.time()
        cutoff = now - lease_seconds if lease_seconds > 0 else float("-inf")
        with self._write() as con:
            overlap = int((con.execute("SELECT value FROM meta WHERE key = 'overlap'").fetchone() or ("1",))[0])
            row = con.execute(
                """
                SELECT a.pair_id FROM assignments a
                WHERE a.labeler_id = ? AND NOT EXISTS (
                    SELECT 1 FROM labels l
                    WHERE l.pair_id = a.pair_id AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL)
                ORDER BY a.undo_seq IS NULL, a.undo_seq DESC, a.assigned_at, a.pair_id
                LIMIT 1
                """,
                (labeler.id,),
            ).fetchone()
            if row is not None:
                pair_id = row[0]
                con.execute(
                    "UPDATE assignments SET assigned_at = ? WHERE pair_id = ? AND labeler_id = ?",
                    (now, pair_id, labeler.id),
                )
            else:
                row = con.execute(
                    _HELD_SQL + "SELECT pair_id FROM held WHERE mine = 0 AND taken < :overlap "
                    "ORDER BY taken DESC, pair_id LIMIT 1",
                    {"cutoff": cutoff, "me": labeler.id, "overlap": overlap},
                ).fetchone()
                if row is None:
                    row = con.execute(
                        """
                        SELECT p.id FROM pairs p
                        WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.pair_id = p.id)
                        ORDER BY p.id LIMIT 1
                        """
                    ).fetchone()
                if row is None:
                    return None
                pair_id = row[0]
                con.execute(
                    "INSERT INTO assignments (pair_id, labeler_id, assigned_at) VALUES (?, ?, ?)",
                    (pair_id, labeler.id, now),
                )
            return self._view(con, pair_id)

    def _view(self, con: sqlite3.Connection, pair_id: int) -> PairView:
        prompt_json, left, right = con.execute(
            """
            SELECT pr.prompt_json, cl.text, cr.text FROM pairs p
            JOIN prompts pr ON pr.id = p.prompt_id
            JOIN completions cl ON cl.id = p.left_id
            JOIN completions cr ON cr.id = CASE WHEN p.left_id = p.first_id THEN p.second_id ELSE p.first_id END
            WHERE p.id = ?
            """,
            (pair_id,),
        ).fetchone()
        return PairView(pair_id, json.loads(prompt_json), left, right)

    def progress(self, labeler: Labeler, lease_seconds: float = 0.0) -> dict[str, int]:
        """``done``: this labeler's labels; ``remaining``: pairs they could still get (others may take some)."""
        cutoff = time.time() - lease_seconds if lease_seconds > 0 else float("-inf")
        with self._read() as con:
            overlap = int((con.execute("SELECT value FROM meta WHERE key = 'overlap'").fetchone() or ("1",))[0])
            done = con.execute(
                "SELECT count(*) FROM labels WHERE labeler_id = ? AND undone_at IS NULL", (labeler.id,)
            ).fetchone()[0]
            assigned = con.execute("SELECT count(*) FROM assignments WHERE labeler_id = ?", (labeler.id,)).fetchone()[0]
            open_held = assigned - done
            held_available = con.execute(
                _HELD_SQL + "SELECT count(*) FROM held WHERE mine = 0 AND taken < :overlap",
                {"cutoff": cutoff, "me": labeler.id, "overlap": overlap},
            ).fetchone()[0]
            fresh = con.execute(
                "SELECT count(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.pair_id = p.id)"
            ).fetchone()[0]
        return {"done": done, "remaining": open_held + held_available + fresh}

    # ------------------------------------------------------------------------------------------
    # Labels

    def add_label(self, labeler: Labeler, pair_id: int, choice: str, note: str | None = None) -> tuple[int, bool]:
        """Record a label in one transaction; returns (label id, created).

        Posting the very same label again (a retry after a lost reply) returns the existing one with
        created False, so a retry never doubles a label; a different label for a labelled pair is
        refused (undo it first).
        """
        if choice not in CHOICES:
            raise RlhfkitError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        note = _clean_note(note)
        with self._write() as con:
            row = con.execute(
                """
                SELECT p.left_id, lb.revoked_at FROM assignments a
                JOIN pairs p ON p.id = a.pair_id JOIN labelers lb ON lb.id = a.labeler_id
                WHERE a.pair_id = ? AND a.labeler_id = ?
                """,
                (pair_id, labeler.id),
            ).fetchone()
            if row is None or row[1] is not None:
                raise NotAssignedError(f"pair {pair_id} is not assigned to {labeler.name}")
            existing = con.execute(
                "SELECT id, choice, note FROM labels WHERE pair_id = ? AND labeler_id = ? AND undone_at IS NULL",
                (pair_id, labeler.id),
            ).fetchone()
            if existing is not None:
                if existing[1] == choice and existing[2] == note:
                    return existing[0], False
                raise AlreadyLabeledError(f"pair {pair_id} already has a label ({existing[1]}); undo it first")
            cur = con.execute(
                "INSERT INTO labels (pair_id, labeler_id, choice, left_id, note, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (pair_id, labeler.id, choice, row[0], note, now_iso()),
            )
            con.execute(
                "UPDATE assignments SET undo_seq = NULL WHERE pair_id = ? AND labeler_id = ?", (pair_id, labeler.id)
            )
            return int(cur.lastrowid), True

    def undo(self, labeler: Labeler) -> dict[str, Any]:
        """Withdraw the labeler's most recent live label; that pair is the next one they get.

        The label row is kept, marked undone (an audit trail); export and stats ignore it.
        """
        with self._write() as con:
            row = con.execute(
                """
                SELECT id, pair_id, choice, note FROM labels
                WHERE labeler_id = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1
                """,
                (labeler.id,),
            ).fetchone()
            if row is None:
                raise NothingToUndoError("nothing to undo")
            label_id, pair_id, choice, note = row
            con.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now_iso(), label_id))
            con.execute(
                """
                UPDATE assignments SET assigned_at = ?,
                    undo_seq = (SELECT coalesce(max(undo_seq), 0) + 1 FROM assignments)
                WHERE pair_id = ? AND labeler_id = ?
                """,
                (time.time(), pair_id, labeler.id),
            )
        return {"label_id": label_id, "pair_id": pair_id, "choice": choice, "note": note}

    def label_rows(self) -> list[LabelRow]:
        """Every live label, oldest first, with its pair's texts and the outcome in import order."""
        with self._read() as con:
            rows = con.execute(
                """
                SELECT l.id, l.pair_id, lb.name, l.choice, l.left_id = p.first_id, l.created_at, l.note,
                       pr.prompt_json, pr.extra_json, c1.text, c2.text, c1.model, c2.model
                FROM labels l
                JOIN labelers lb ON lb.id = l.labeler_id
                JOIN pairs p ON p.id = l.pair_id
                JOIN prompts pr ON pr.id = p.prompt_id
                JOIN completions c1 ON c1.id = p.first_id
                JOIN completions c2 ON c2.id = p.second_id
                WHERE l.undone_at IS NULL
                ORDER BY l.id
                """
            ).fetchall()
        out = []
        for lid, pid, name, choice, left_first, created, note, pj, ej, t1, t2, m1, m2 in rows:
            out.append(
                LabelRow(
                    label_id=lid,
                    pair_id=pid,
                    labeler=name,
                    choice=choice,
                    outcome=outcome_of(choice, bool(left_first)),
                    created_at=created,
                    note=note,
                    prompt=json.loads(pj),
                    prompt_extra=json.loads(ej),
                    first=t1,
                    second=t2,
                    first_model=m1,
                    second_model=m2,
                )
            )
        return out

    def stats(self) -> dict[str, Any]:
        """``rlhf label stats`` as a dict (the admin page shows the same)."""
        from rlhfkit.labeling.stats import summarize

        with self._read() as con:
            total = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
            names = [r[0] for r in con.execute("SELECT name FROM labelers ORDER BY id")]
            revoked = {r[0] for r in con.execute("SELECT name FROM labelers WHERE revoked_at IS NOT NULL")}
        return summarize(self.label_rows(), total_pairs=total, overlap=self.overlap, labelers=names, revoked=revoked)


# Per pair that has assignments: how many labelers hold it (see next_pair) and whether :me is one.
_HELD_SQL = """
WITH held AS (
    SELECT a.pair_id AS pair_id,
           sum(CASE WHEN l.id IS NOT NULL THEN l.choice != 'skip'
                    WHEN lb.revoked_at IS NULL AND a.assigned_at > :cutoff THEN 1
                    ELSE 0 END) AS taken,
           max(a.labeler_id = :me) AS mine
    FROM assignments a
    JOIN labelers lb ON lb.id = a.labeler_id
    LEFT JOIN labels l ON l.pair_id = a.pair_id AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL
    GROUP BY a.pair_id
)
"""


def outcome_of(choice: str, left_is_first: bool) -> str:
    """Map a choice as shown (a = left) back to the pair's own order: first / second / tie / skip."""
    if choice in ("tie", "skip"):
        return choice
    return "first" if (choice == "a") == left_is_first else "second"


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS or not NAME_PATTERN.match(name):
        raise RlhfkitError(f"labeler name must be 1 to {MAX_NAME_CHARS} printable characters, got {name!r}")
    return name


def _clean_note(note: str | None) -> str | None:
    if note is None or not note.strip():
        return None
    if len(note) > MAX_NOTE_CHARS:
        raise RlhfkitError(f"note is {len(note)} characters; at most {MAX_NOTE_CHARS}")
    return note.strip()


# ----------------------------------------------------------------------------------------------
# Export


def _extra(row: LabelRow, first_wins: bool) -> dict[str, Any]:
    """Candidate extras plus the model(s) that wrote the two completions."""
    extra: dict[str, Any] = dict(row.prompt_extra)
    chosen_model, rejected_model = (
        (row.first_model, row.second_model) if first_wins else (row.second_model, row.first_model)
    )
    if chosen_model == rejected_model:
        if chosen_model is not None:
            extra.setdefault("model", chosen_model)
    else:
        extra["model_chosen"], extra["model_rejected"] = chosen_model, rejected_model
    return extra


def _record(row: LabelRow, outcome: str, extra: dict[str, Any]) -> PreferenceRecord:
    """chosen/rejected from an outcome; a tie or skip keeps the pair's own order and says so."""
    first_wins = outcome != "second"
    chosen, rejected = (row.first, row.second) if first_wins else (row.second, row.first)
    full = _extra(row, first_wins)
    full.update(extra)
    if outcome in ("tie", "skip"):
        full[outcome] = True
    return PreferenceRecord(prompt=row.prompt, chosen=chosen, rejected=rejected, extra=full)


def majority(outcomes: list[str]) -> tuple[str | None, float]:
    """The strict-majority outcome of a pair's decided labels and its share (None on a tie for the top)."""
    if not outcomes:
        return None, 0.0
    ranked = Counter(outcomes).most_common()
    top, count = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == count:
        return None, count / len(outcomes)
    return top, count / len(outcomes)


def export_rows(
    store: LabelStore,
    fmt: str = "trl",
    *,
    include_ties: bool = False,
    include_skips: bool = False,
    aggregate: str = "none",
    min_agreement: float = 0.0,
    min_labels: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference rows and counts of what was left out.

    ``aggregate="none"``: one row per live label, with ``labeler``, ``created_at``, ``pair_id`` and
    ``note``. ``"majority"``: one row per pair, the strict majority of its decided labels, with
    ``labelers``, ``votes`` and ``agreement`` (the majority's share). Either way a pair with decided
    labels is kept only when it has ``min_labels`` of them and a majority share of at least
    ``min_agreement``; a pair with only skips is governed by ``include_skips`` alone.
    Ties and skips keep the pair's import order and carry ``"tie": true`` / ``"skip": true``; only
    the TRL form can hold them (Vertex's ``choice`` is 0 or 1).
    """
    if fmt not in ("trl", "vertex"):
        raise RlhfkitError(f"format must be 'trl' or 'vertex', got {fmt!r}")
    if aggregate not in ("none", "majority"):
        raise RlhfkitError(f"aggregate must be 'none' or 'majority', got {aggregate!r}")
    if fmt == "vertex" and (include_ties or include_skips):
        raise RlhfkitError("Vertex rows need choice 0 or 1: ties and skips can only be exported with --format trl")
    if aggregate == "majority" and include_skips:
        raise RlhfkitError("--include-skips has no meaning with --aggregate majority (skips are not votes)")
    labels = store.label_rows()
    by_pair: dict[int, list[LabelRow]] = defaultdict(list)
    for row in labels:
        by_pair[row.pair_id].append(row)
    dropped: Counter[str] = Counter()
    kept: set[int] = set()
    for pair_id, rows in by_pair.items():
        decided = [r for r in rows if r.choice in DECIDED]
        share = majority([r.outcome for r in decided])[1]
        unit = len(rows) if aggregate == "none" else 1
        if not decided:  # only skips: they follow include_skips (per label) or count as "only skips"
            kept.add(pair_id)
        elif len(decided) < min_labels:
            dropped["too_few_labels"] += unit
        elif share < min_agreement:
            dropped["low_agreement"] += unit
        else:
            kept.add(pair_id)
    out: list[dict[str, Any]] = []
    if aggregate == "none":
        for r in labels:  # oldest first
            if r.pair_id not in kept:
                continue
            if (r.outcome == "tie" and not include_ties) or (r.outcome == "skip" and not include_skips):
                dropped[r.outcome] += 1
                continue
            extra = {"labeler": r.labeler, "created_at": r.created_at, "pair_id": r.pair_id}
            if r.note:
                extra["note"] = r.note
            out.append(preference_row(_record(r, r.outcome, extra), fmt))
        return out, dict(dropped)
    for pair_id, rows in by_pair.items():  # pairs in order of their first label
        if pair_id not in kept:
            continue
        decided = [r for r in rows if r.choice in DECIDED]
        winner, share = majority([r.outcome for r in decided])
        if winner is None:
            dropped["no_majority" if decided else "only_skips"] += 1
            continue
        if winner == "tie" and not include_ties:
            dropped["tie"] += 1
            continue
        extra = {
            "labelers": [r.labeler for r in decided],
            "votes": len(decided),
            "agreement": round(share, 6),
            "created_at": max(r.created_at for r in decided if r.outcome == winner),
            "pair_id": pair_id,
        }
        notes = [f"{r.labeler}: {r.note}" for r in decided if r.note]
        if notes:
            extra["notes"] = notes
        out.append(preference_row(_record(rows[0], winner, extra), fmt))
    return out, dict(dropped)

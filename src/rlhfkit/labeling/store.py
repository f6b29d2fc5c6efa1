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
import random
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

SCHEMA_VERSION = 2
CHOICES = ("a", "b", "tie", "skip")
DECIDED = ("a", "b", "tie")
STRENGTHS = ("much", "slightly")
MODES = ("pair", "rank")
SELECTS = ("order", "random", "uncertain")
MAX_NOTE_CHARS = 2000
MAX_NAME_CHARS = 64
MAX_RANK_COMPLETIONS = 16
MIN_ADMIN_TOKEN_CHARS = 16
NAME_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]+$")

TABLES = """
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
    gold TEXT CHECK (gold IN ('first', 'second')),  -- a gold pair's known winner; NULL for a real pair
    uncertainty REAL,                         -- |P(first > second) - 0.5| under the latest reward model
    shuffle_key INTEGER NOT NULL DEFAULT 0,   -- random, drawn at import: the order of --select random
    public_id INTEGER,                        -- random: the id labelers see, so ids reveal no import order
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
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    order_json TEXT NOT NULL,                 -- completion ids, best first
    shown_json TEXT NOT NULL,                 -- completion ids in the order they were shown
    note TEXT,
    guidelines_hash TEXT,
    seconds REAL,
    created_at TEXT NOT NULL,
    undone_at TEXT
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL,
    labeler_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    left_id INTEGER NOT NULL,                 -- the completion shown as A (or higher up) when labelled
    note TEXT,
    created_at TEXT NOT NULL,
    undone_at TEXT,
    strength TEXT CHECK (strength IN ('much', 'slightly')),
    guidelines_hash TEXT,                     -- sha256 of the guidelines in force when the label was given
    seconds REAL,                             -- from the pair being shown to the label
    ranking_id INTEGER REFERENCES rankings(id),  -- set when the label is one pair of a ranking
    FOREIGN KEY (pair_id, labeler_id) REFERENCES assignments(pair_id, labeler_id)
);
CREATE TABLE IF NOT EXISTS acknowledgements (
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    guidelines_hash TEXT NOT NULL,
    acknowledged_at TEXT NOT NULL,
    PRIMARY KEY (labeler_id, guidelines_hash)
);
CREATE TABLE IF NOT EXISTS judge_scores (
    completion_id INTEGER NOT NULL REFERENCES completions(id),
    judge TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (completion_id, judge)
);
"""

INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS labels_one_live ON labels(pair_id, labeler_id) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS labels_by_labeler ON labels(labeler_id, id);
CREATE INDEX IF NOT EXISTS labels_by_ranking ON labels(ranking_id);
CREATE INDEX IF NOT EXISTS pairs_by_prompt ON pairs(prompt_id);
CREATE UNIQUE INDEX IF NOT EXISTS pairs_by_public_id ON pairs(public_id);
CREATE UNIQUE INDEX IF NOT EXISTS rankings_one_live ON rankings(prompt_id, labeler_id) WHERE undone_at IS NULL;
"""

# Columns added by schema 2; a schema-1 database gets them (NULL / 0) when first opened.
MIGRATIONS_1_TO_2 = {
    "pairs": [
        "gold TEXT CHECK (gold IN ('first', 'second'))",
        "uncertainty REAL",
        "shuffle_key INTEGER NOT NULL DEFAULT 0",
        "public_id INTEGER",
    ],
    "labels": [
        "strength TEXT CHECK (strength IN ('much', 'slightly'))",
        "guidelines_hash TEXT",
        "seconds REAL",
        "ranking_id INTEGER REFERENCES rankings(id)",
    ],
}


class NotAssignedError(RlhfkitError):
    """A label for a pair this labeler was never given (HTTP 409)."""


class AlreadyLabeledError(RlhfkitError):
    """A second, different label for a pair this labeler already labelled (HTTP 409; undo first)."""


class NothingToUndoError(RlhfkitError):
    """Undo with no live label left (HTTP 409)."""


class GuidelinesNotAcknowledgedError(RlhfkitError):
    """Labeling before acknowledging the current guidelines (HTTP 428)."""


class GuidelinesChangedError(RlhfkitError):
    """An acknowledgement of guidelines that are no longer the current ones (HTTP 409)."""


class WrongModeError(RlhfkitError):
    """A pair label in a ranking campaign or a ranking in a pair campaign (HTTP 409)."""


class BadRankingError(RlhfkitError):
    """A ranking that is not an order of exactly the task's completions (HTTP 422)."""


@dataclass(frozen=True)
class Labeler:
    """An active labeler, as found from a token."""

    id: int
    name: str


@dataclass(frozen=True)
class PairView:
    """What one labeler is shown: A is the stored left completion, B the right one.

    ``public_id`` is the pair's id on the web page: random, so a labeler cannot tell gold pairs
    (imported apart) from the others by their ids.
    """

    pair_id: int
    prompt: Prompt
    a: str
    b: str
    public_id: int = 0


@dataclass(frozen=True)
class RankView:
    """A prompt to rank: its completions as (completion id, text), in the order this labeler sees them."""

    prompt_id: int
    prompt: Prompt
    completions: list[tuple[int, str]]


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
    strength: str | None = None  # much / slightly, with a decided a or b
    ranking_id: int | None = None  # the ranking this label is one pair of
    guidelines_sha256: str | None = None
    seconds: float | None = None  # from the pair being shown to the label
    gold: str | None = None  # a gold pair's known winner (first / second)
    judge_outcome: str | None = None  # first / second / tie by the stored judge's scores


def _migrate_1_to_2(con: sqlite3.Connection) -> None:
    """Add schema 2's columns to a schema-1 database in one transaction; its labels are kept as they are."""
    con.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in MIGRATIONS_1_TO_2.items():
            have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        con.execute("UPDATE pairs SET shuffle_key = abs(random()) WHERE shuffle_key = 0")
        con.execute(f"UPDATE pairs SET public_id = 1 + abs(random()) % {PUBLIC_ID_RANGE} WHERE public_id IS NULL")
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


PUBLIC_ID_RANGE = 2**52  # below 2**53: exact as a JavaScript number


def _public_id() -> int:
    return 1 + secrets.randbelow(PUBLIC_ID_RANGE)


def _shuffle_key() -> int:
    return 1 + secrets.randbits(62)


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
                con.executescript(TABLES)
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 1:
                    _migrate_1_to_2(con)
                elif int(row[0]) != SCHEMA_VERSION:
                    raise RlhfkitError(f"{self.path}: schema version {row[0]}, this rlhfkit reads {SCHEMA_VERSION}")
                con.executescript(INDEXES)
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
            return _meta(con, key)

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as con:
            _put_meta(con, key, value)

    @property
    def overlap(self) -> int:
        """Labelers per pair, as set by the latest ``serve --overlap``."""
        return int(self.get_meta("overlap") or 1)

    def set_overlap(self, overlap: int) -> None:
        if overlap < 1:
            raise RlhfkitError(f"overlap must be >= 1, got {overlap}")
        self.set_meta("overlap", str(overlap))

    @property
    def mode(self) -> str:
        """``pair``: pick the better of two; ``rank``: order all of a prompt's completions."""
        return self.get_meta("mode") or "pair"

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise RlhfkitError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.set_meta("mode", mode)

    @property
    def select(self) -> str:
        """Order of new pairs: ``order`` (import order), ``random``, ``uncertain`` (reward model least sure first)."""
        return self.get_meta("select") or "order"

    def set_select(self, select: str) -> None:
        if select not in SELECTS:
            raise RlhfkitError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
        self.set_meta("select", select)

    @property
    def gold_rate(self) -> float:
        """Share of a labeler's new pairs that are gold pairs (while unseen gold pairs are left)."""
        return float(self.get_meta("gold_rate") or 0.0)

    def set_gold_rate(self, rate: float) -> None:
        if not 0.0 <= rate < 1.0:
            raise RlhfkitError(f"gold rate must be in [0, 1), got {rate}")
        self.set_meta("gold_rate", repr(float(rate)))

    def guidelines(self) -> tuple[str | None, str | None]:
        """(Markdown, its sha256) of the campaign's guidelines, or (None, None)."""
        return self.get_meta("guidelines_md"), self.get_meta("guidelines_sha256")

    def set_guidelines(self, markdown: str) -> str:
        """Store the guidelines; every labeler acknowledges a new version before labeling on. Returns its sha256."""
        if not markdown.strip():
            raise RlhfkitError("guidelines are empty")
        digest = hashlib.sha256(markdown.encode("utf-8")).hexdigest()
        with self._write() as con:  # text and hash change together
            _put_meta(con, "guidelines_md", markdown)
            _put_meta(con, "guidelines_sha256", digest)
        return digest

    def acknowledge(self, labeler: Labeler, sha256: str) -> None:
        """Record that ``labeler`` read the guidelines whose hash is ``sha256`` (they must be the current ones)."""
        with self._write() as con:
            current = _meta(con, "guidelines_sha256")
            if current is None or sha256 != current:
                raise GuidelinesChangedError("these are not the current guidelines; reload the page and read them")
            con.execute("INSERT OR IGNORE INTO acknowledgements VALUES (?, ?, ?)", (labeler.id, sha256, now_iso()))

    def has_acknowledged(self, labeler: Labeler) -> bool:
        """True when there are no guidelines or the labeler acknowledged the current ones."""
        with self._read() as con:
            return _acknowledged(con, labeler.id)

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
                        "INSERT OR IGNORE INTO pairs (prompt_id, first_id, second_id, left_id, shuffle_key, public_id) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (prompt_id, ids[i], ids[j], left, _shuffle_key(), _public_id()),
                    )
                    summary.pairs_added += cur.rowcount
            summary.pairs_total = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        return summary

    def import_gold(self, records: Iterable[PreferenceRecord], source: str = "gold") -> int:
        """Add gold pairs (prompt, chosen, rejected with a known answer); returns how many are new.

        A gold pair is served like any other pair (``gold_rate`` of a labeler's new pairs) and never
        exported: it only measures its labelers. A gold pair equal to a pair to label is refused.
        """
        added = 0
        with self._write() as con:
            for row, record in enumerate(records, start=1):
                where = f"{source}: row {row}"
                if record.chosen.strip() == record.rejected.strip():
                    raise RlhfkitError(f"{where}: chosen and rejected are the same text; a gold pair needs two")
                key = _prompt_key(record.prompt)
                con.execute(
                    "INSERT OR IGNORE INTO prompts (prompt_key, prompt_json) VALUES (?, ?)",
                    (key, json.dumps(record.prompt, ensure_ascii=False)),
                )
                (prompt_id,) = con.execute("SELECT id FROM prompts WHERE prompt_key = ?", (key,)).fetchone()
                ids = []
                for text in (record.chosen, record.rejected):
                    con.execute("INSERT OR IGNORE INTO completions (prompt_id, text) VALUES (?, ?)", (prompt_id, text))
                    ids.append(
                        con.execute(
                            "SELECT id FROM completions WHERE prompt_id = ? AND text = ?", (prompt_id, text)
                        ).fetchone()[0]
                    )
                first, second = sorted(ids)
                gold = "first" if ids[0] == first else "second"
                existing = con.execute(
                    "SELECT gold FROM pairs WHERE first_id = ? AND second_id = ?", (first, second)
                ).fetchone()
                if existing is not None:
                    if existing[0] is None:
                        raise RlhfkitError(f"{where}: this pair is also a pair to label; gold pairs must differ")
                    if existing[0] != gold:
                        raise RlhfkitError(f"{where}: this gold pair was imported before with the other answer")
                    continue
                left = first if secrets.randbelow(2) == 0 else second
                con.execute(
                    "INSERT INTO pairs (prompt_id, first_id, second_id, left_id, gold, shuffle_key, public_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (prompt_id, first, second, left, gold, _shuffle_key(), _public_id()),
                )
                added += 1
        return added

    def counts(self) -> dict[str, int]:
        """Prompts, completions, pairs to label and gold pairs."""
        with self._read() as con:
            out = {
                table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("prompts", "completions")
            }
            out["pairs"] = con.execute("SELECT count(*) FROM pairs WHERE gold IS NULL").fetchone()[0]
            out["gold_pairs"] = con.execute("SELECT count(*) FROM pairs WHERE gold IS NOT NULL").fetchone()[0]
            return out

    def largest_ranking(self) -> int:
        """The most completions one prompt's ranking would order (those in its pairs to label)."""
        with self._read() as con:
            row = con.execute(
                """
                SELECT max(n) FROM (SELECT count(DISTINCT c) AS n FROM (
                    SELECT prompt_id, first_id AS c FROM pairs WHERE gold IS NULL
                    UNION ALL SELECT prompt_id, second_id FROM pairs WHERE gold IS NULL) GROUP BY prompt_id)
                """
            ).fetchone()
        return int(row[0] or 0)

    # ------------------------------------------------------------------------------------------
    # Active selection and judge scores

    def pairs_to_score(self) -> list[tuple[int, Prompt, str, str]]:
        """(pair id, prompt, first text, second text) of every pair to label, for a reward model to score."""
        with self._read() as con:
            rows = con.execute(
                """
                SELECT p.id, pr.prompt_json, c1.text, c2.text FROM pairs p
                JOIN prompts pr ON pr.id = p.prompt_id
                JOIN completions c1 ON c1.id = p.first_id JOIN completions c2 ON c2.id = p.second_id
                WHERE p.gold IS NULL ORDER BY p.id
                """
            ).fetchall()
        return [(pid, json.loads(pj), t1, t2) for pid, pj, t1, t2 in rows]

    def set_uncertainty(self, uncertainty: dict[int, float]) -> None:
        """Store ``|P(first > second) - 0.5|`` per pair; ``--select uncertain`` serves the smallest first."""
        with self._write() as con:
            con.executemany("UPDATE pairs SET uncertainty = ? WHERE id = ?", [(u, i) for i, u in uncertainty.items()])

    def completions_to_judge(self, judge: str) -> list[tuple[int, Prompt, str]]:
        """(completion id, prompt, text) of completions in pairs that ``judge`` has not scored yet."""
        with self._read() as con:
            rows = con.execute(
                """
                SELECT c.id, pr.prompt_json, c.text FROM completions c JOIN prompts pr ON pr.id = c.prompt_id
                WHERE EXISTS (SELECT 1 FROM pairs p WHERE c.id IN (p.first_id, p.second_id))
                  AND NOT EXISTS (SELECT 1 FROM judge_scores j WHERE j.completion_id = c.id AND j.judge = ?)
                ORDER BY c.id
                """,
                (judge,),
            ).fetchall()
        return [(cid, json.loads(pj), text) for cid, pj, text in rows]

    def set_judge_scores(self, judge: str, scores: dict[int, float]) -> None:
        """Store a judge's scores; ``stats`` compares each labeler with the judge named in meta ``judge``."""
        with self._write() as con:
            con.executemany(
                "INSERT INTO judge_scores VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET score = excluded.score",
                [(cid, judge, float(v)) for cid, v in scores.items()],
            )
            _put_meta(con, "judge", judge)

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

    def _order_terms(self, con: sqlite3.Connection) -> list[str]:
        """SQL ORDER BY terms over pairs ``p`` for new pairs under the campaign's ``select``."""
        select = _meta(con, "select") or "order"
        if select == "random":
            return ["p.shuffle_key"]
        if select == "uncertain":  # scored pairs, least sure first; the rest at random
            return ["p.uncertainty IS NULL", "p.uncertainty", "p.shuffle_key"]
        return ["p.id"]

    def next_pair(self, labeler: Labeler, lease_seconds: float = 0.0) -> PairView | None:
        """The pair this labeler should label now, or None when nothing is left for them.

        Their own unlabelled assignment comes first (the most recently undone one before any other),
        so a reload or an undo shows the same pair. Otherwise a new pair is assigned: one not yet
        assigned to them, held by fewer than ``overlap`` labelers; partly labelled pairs first, so
        overlapping labels (and agreement numbers) arrive early, then new pairs in ``select`` order.
        A pair counts as held by a labeler who gave it a decided label (skips free the slot) or who
        holds an unexpired assignment (``lease_seconds`` > 0 lets pairs abandoned by their labeler
        go to someone else). With a gold rate, that share of new assignments is an unseen gold pair
        instead, drawn at random; gold pairs are never the only thing left to label.
        """
        now = time.time()
        cutoff = now - lease_seconds if lease_seconds > 0 else float("-inf")
        with self._write() as con:
            overlap = int(_meta(con, "overlap") or 1)
            row = con.execute(_OWN_OPEN_SQL + " LIMIT 1", (labeler.id,)).fetchone()
            if row is not None:
                pair_id = row[0]
                con.execute(
                    "UPDATE assignments SET assigned_at = ? WHERE pair_id = ? AND labeler_id = ?",
                    (now, pair_id, labeler.id),
                )
                return self._view(con, pair_id)
            order = ", ".join(self._order_terms(con))
            row = con.execute(
                _HELD_SQL + "SELECT h.pair_id FROM held h JOIN pairs p ON p.id = h.pair_id "
                f"WHERE h.mine = 0 AND h.taken < :overlap ORDER BY h.taken DESC, {order} LIMIT 1",
                {"cutoff": cutoff, "me": labeler.id, "overlap": overlap},
            ).fetchone()
            if row is None:
                row = con.execute(
                    "SELECT p.id FROM pairs p WHERE p.gold IS NULL AND NOT EXISTS "
                    f"(SELECT 1 FROM assignments a WHERE a.pair_id = p.id) ORDER BY {order} LIMIT 1"
                ).fetchone()
            if row is None:
                return None
            pair_id = row[0]
            if _GOLD_DRAW.random() < float(_meta(con, "gold_rate") or 0.0):
                gold = con.execute(
                    """
                    SELECT p.id FROM pairs p WHERE p.gold IS NOT NULL AND NOT EXISTS
                        (SELECT 1 FROM assignments a WHERE a.pair_id = p.id AND a.labeler_id = ?)
                    ORDER BY random() LIMIT 1
                    """,
                    (labeler.id,),
                ).fetchone()
                if gold is not None:
                    pair_id = gold[0]
            con.execute(
                "INSERT INTO assignments (pair_id, labeler_id, assigned_at) VALUES (?, ?, ?)",
                (pair_id, labeler.id, now),
            )
            return self._view(con, pair_id)

    def next_ranking(self, labeler: Labeler, lease_seconds: float = 0.0) -> RankView | None:
        """The prompt this labeler should rank now (all its completions), or None when nothing is left.

        The same rules as ``next_pair``, per prompt: their own unranked prompt first, else a prompt
        none of whose pairs they were given, held by fewer than ``overlap`` labelers (a prompt is as
        held as its most held pair), partly ranked prompts first. Gold pairs take no part.
        """
        now = time.time()
        cutoff = now - lease_seconds if lease_seconds > 0 else float("-inf")
        with self._write() as con:
            overlap = int(_meta(con, "overlap") or 1)
            row = con.execute(
                """
                SELECT p.prompt_id FROM assignments a JOIN pairs p ON p.id = a.pair_id
                WHERE a.labeler_id = ? AND p.gold IS NULL
                GROUP BY p.prompt_id
                HAVING count(*) = (SELECT count(*) FROM pairs q WHERE q.prompt_id = p.prompt_id AND q.gold IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM labels l JOIN pairs q ON q.id = l.pair_id
                                   WHERE q.prompt_id = p.prompt_id AND l.labeler_id = ? AND l.undone_at IS NULL)
                ORDER BY max(a.undo_seq) IS NULL, max(a.undo_seq) DESC, min(a.assigned_at), p.prompt_id
                LIMIT 1
                """,
                (labeler.id, labeler.id),
            ).fetchone()
            if row is None:
                terms = self._order_terms(con)
                keys = ", ".join(f"min({term}) AS k{i}" for i, term in enumerate(terms))
                row = con.execute(
                    _PROMPTS_HELD_SQL.format(keys=keys)
                    + " WHERE mine = 0 AND taken < :overlap ORDER BY taken DESC, "
                    + ", ".join(f"k{i}" for i in range(len(terms)))
                    + " LIMIT 1",
                    {"cutoff": cutoff, "me": labeler.id, "overlap": overlap},
                ).fetchone()
                if row is None:
                    return None
            prompt_id = row[0]
            con.execute(
                """
                INSERT INTO assignments (pair_id, labeler_id, assigned_at)
                SELECT id, ?, ? FROM pairs WHERE prompt_id = ? AND gold IS NULL
                ON CONFLICT (pair_id, labeler_id) DO UPDATE SET assigned_at = excluded.assigned_at
                """,
                (labeler.id, now, prompt_id),
            )
            return self._rank_view(con, prompt_id, labeler.id)

    def _view(self, con: sqlite3.Connection, pair_id: int) -> PairView:
        prompt_json, left, right, public_id = con.execute(
            """
            SELECT pr.prompt_json, cl.text, cr.text, p.public_id FROM pairs p
            JOIN prompts pr ON pr.id = p.prompt_id
            JOIN completions cl ON cl.id = p.left_id
            JOIN completions cr ON cr.id = CASE WHEN p.left_id = p.first_id THEN p.second_id ELSE p.first_id END
            WHERE p.id = ?
            """,
            (pair_id,),
        ).fetchone()
        return PairView(pair_id, json.loads(prompt_json), left, right, public_id)

    def pair_id_for(self, public_id: int) -> int | None:
        """The pair whose web-page id is ``public_id`` (None: no such pair)."""
        with self._read() as con:
            row = con.execute("SELECT id FROM pairs WHERE public_id = ?", (public_id,)).fetchone()
        return None if row is None else row[0]

    def public_id_of(self, pair_id: int) -> int:
        with self._read() as con:
            return con.execute("SELECT public_id FROM pairs WHERE id = ?", (pair_id,)).fetchone()[0]

    def _rank_view(self, con: sqlite3.Connection, prompt_id: int, labeler_id: int) -> RankView:
        (prompt_json,) = con.execute("SELECT prompt_json FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        texts = dict(_rank_completions(con, prompt_id))
        shown = _shown_order(labeler_id, list(texts))
        return RankView(prompt_id, json.loads(prompt_json), [(cid, texts[cid]) for cid in shown])

    def progress(self, labeler: Labeler, lease_seconds: float = 0.0) -> dict[str, int]:
        """``done``: this labeler's labels (a ranking counts once); ``remaining``: pairs (or prompts, when
        ranking) they could still get (others may take some)."""
        cutoff = time.time() - lease_seconds if lease_seconds > 0 else float("-inf")
        args = {"cutoff": cutoff, "me": labeler.id}
        with self._read() as con:
            args["overlap"] = int(_meta(con, "overlap") or 1)
            done = con.execute(
                """
                SELECT (SELECT count(*) FROM labels WHERE labeler_id = :me AND undone_at IS NULL
                                                          AND ranking_id IS NULL)
                     + (SELECT count(*) FROM rankings WHERE labeler_id = :me AND undone_at IS NULL)
                """,
                args,
            ).fetchone()[0]
            open_held = con.execute(_OWN_OPEN_SQL, (labeler.id,)).fetchall()
            if (_meta(con, "mode") or "pair") == "rank":
                available = con.execute(
                    "SELECT count(*) FROM ("
                    + _PROMPTS_HELD_SQL.format(keys="0 AS k0")
                    + " WHERE mine = 0 AND taken < :overlap)",
                    args,
                ).fetchone()[0]
                remaining = len({prompt for _, prompt in open_held}) + available
            else:
                held_available = con.execute(
                    _HELD_SQL + "SELECT count(*) FROM held WHERE mine = 0 AND taken < :overlap", args
                ).fetchone()[0]
                fresh = con.execute(
                    "SELECT count(*) FROM pairs p WHERE p.gold IS NULL AND NOT EXISTS "
                    "(SELECT 1 FROM assignments a WHERE a.pair_id = p.id)"
                ).fetchone()[0]
                remaining = len(open_held) + held_available + fresh
        return {"done": done, "remaining": remaining}

    # ------------------------------------------------------------------------------------------
    # Labels

    def add_label(
        self,
        labeler: Labeler,
        pair_id: int,
        choice: str,
        note: str | None = None,
        strength: str | None = None,
    ) -> tuple[int, bool]:
        """Record a label in one transaction; returns (label id, created).

        ``strength`` (``much`` / ``slightly``, only with a or b) says by how much the choice is
        better; export turns it into a Bradley-Terry margin. Posting the very same label again (a
        retry after a lost reply) returns the existing one with created False, so a retry never
        doubles a label; a different label for a labelled pair is refused (undo it first).
        """
        if choice not in CHOICES:
            raise RlhfkitError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if strength is not None and (strength not in STRENGTHS or choice not in ("a", "b")):
            raise RlhfkitError(f"strength must be one of {', '.join(STRENGTHS)}, and only with choice a or b")
        note = _clean_note(note)
        with self._write() as con:
            row = con.execute(
                """
                SELECT p.left_id, lb.revoked_at, a.assigned_at, p.gold FROM assignments a
                JOIN pairs p ON p.id = a.pair_id JOIN labelers lb ON lb.id = a.labeler_id
                WHERE a.pair_id = ? AND a.labeler_id = ?
                """,
                (pair_id, labeler.id),
            ).fetchone()
            if row is None or row[1] is not None:
                raise NotAssignedError(f"pair {pair_id} is not assigned to {labeler.name}")
            existing = con.execute(
                "SELECT id, choice, note, strength FROM labels "
                "WHERE pair_id = ? AND labeler_id = ? AND undone_at IS NULL",
                (pair_id, labeler.id),
            ).fetchone()
            if existing is not None:
                if tuple(existing[1:]) == (choice, note, strength):
                    return existing[0], False
                raise AlreadyLabeledError(f"pair {pair_id} already has a label ({existing[1]}); undo it first")
            if (_meta(con, "mode") or "pair") == "rank" and row[3] is None:
                raise WrongModeError("this campaign ranks whole prompts: POST /api/rank, not /api/label")
            if not _acknowledged(con, labeler.id):
                raise GuidelinesNotAcknowledgedError("read and acknowledge the labeling guidelines first")
            cur = con.execute(
                """
                INSERT INTO labels (pair_id, labeler_id, choice, left_id, note, created_at, strength,
                                    guidelines_hash, seconds)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    pair_id,
                    labeler.id,
                    choice,
                    row[0],
                    note,
                    now_iso(),
                    strength,
                    _meta(con, "guidelines_sha256"),
                    max(0.0, time.time() - row[2]),
                ),
            )
            con.execute(
                "UPDATE assignments SET undo_seq = NULL WHERE pair_id = ? AND labeler_id = ?", (pair_id, labeler.id)
            )
            return int(cur.lastrowid), True

    def add_ranking(
        self, labeler: Labeler, prompt_id: int, order: list[int], note: str | None = None
    ) -> tuple[int, bool]:
        """Record a ranking (completion ids, best first) as one ranking and its K(K-1)/2 pair labels.

        Each pair's label says which of its two completions is ranked higher; its ``left_id`` is the
        one shown higher up, so position bias reads the same as for pairs. Returns (ranking id,
        created); the same ranking posted again is a retry, a different one is refused.
        """
        note = _clean_note(note)
        with self._write() as con:
            if con.execute("SELECT revoked_at FROM labelers WHERE id = ?", (labeler.id,)).fetchone()[0]:
                raise NotAssignedError(f"prompt {prompt_id} is not assigned to {labeler.name}")
            pairs = con.execute(
                """
                SELECT p.id, p.first_id, p.second_id, a.assigned_at FROM pairs p
                LEFT JOIN assignments a ON a.pair_id = p.id AND a.labeler_id = ?
                WHERE p.prompt_id = ? AND p.gold IS NULL
                """,
                (labeler.id, prompt_id),
            ).fetchall()
            if not pairs or any(assigned is None for *_, assigned in pairs):
                raise NotAssignedError(f"prompt {prompt_id} is not assigned to {labeler.name}")
            existing = con.execute(
                "SELECT id, order_json, note FROM rankings "
                "WHERE prompt_id = ? AND labeler_id = ? AND undone_at IS NULL",
                (prompt_id, labeler.id),
            ).fetchone()
            if existing is not None:
                if json.loads(existing[1]) == list(order) and existing[2] == note:
                    return existing[0], False
                raise AlreadyLabeledError(f"prompt {prompt_id} is already ranked; undo it first")
            if con.execute(
                "SELECT 1 FROM labels WHERE labeler_id = ? AND undone_at IS NULL AND pair_id IN "
                "(SELECT id FROM pairs WHERE prompt_id = ?)",
                (labeler.id, prompt_id),
            ).fetchone():
                raise AlreadyLabeledError(f"some pairs of prompt {prompt_id} already have your labels")
            if (_meta(con, "mode") or "pair") != "rank":
                raise WrongModeError("this campaign labels pairs: POST /api/label, not /api/rank")
            if not _acknowledged(con, labeler.id):
                raise GuidelinesNotAcknowledgedError("read and acknowledge the labeling guidelines first")
            ids = [cid for cid, _ in _rank_completions(con, prompt_id)]
            if len(order) != len(set(order)) or sorted(order) != sorted(ids):
                raise BadRankingError(
                    f"order must list each of the prompt's {len(ids)} completion ids once, best first; got {order}"
                )
            rank = {cid: i for i, cid in enumerate(order)}
            shown = _shown_order(labeler.id, ids)
            position = {cid: i for i, cid in enumerate(shown)}
            created, digest = now_iso(), _meta(con, "guidelines_sha256")
            seconds = max(0.0, time.time() - min(assigned for *_, assigned in pairs))
            cur = con.execute(
                """
                INSERT INTO rankings (prompt_id, labeler_id, order_json, shown_json, note, guidelines_hash, seconds,
                                      created_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (prompt_id, labeler.id, json.dumps(list(order)), json.dumps(shown), note, digest, seconds, created),
            )
            ranking_id = int(cur.lastrowid)
            for pair_id, first, second, _ in pairs:
                upper = first if position[first] < position[second] else second
                winner = first if rank[first] < rank[second] else second
                con.execute(
                    """
                    INSERT INTO labels (pair_id, labeler_id, choice, left_id, created_at, guidelines_hash, seconds,
                                        ranking_id)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                    (pair_id, labeler.id, "a" if winner == upper else "b", upper, created, digest, seconds, ranking_id),
                )
            con.execute(
                "UPDATE assignments SET undo_seq = NULL WHERE labeler_id = ? AND pair_id IN "
                "(SELECT id FROM pairs WHERE prompt_id = ?)",
                (labeler.id, prompt_id),
            )
            return ranking_id, True

    def undo(self, labeler: Labeler) -> dict[str, Any]:
        """Withdraw the labeler's most recent live label (or whole ranking); that task is the next they get.

        The rows are kept, marked undone (an audit trail); export and stats ignore them.
        """
        with self._write() as con:
            row = con.execute(
                """
                SELECT id, pair_id, choice, note, strength, ranking_id FROM labels
                WHERE labeler_id = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1
                """,
                (labeler.id,),
            ).fetchone()
            if row is None:
                raise NothingToUndoError("nothing to undo")
            label_id, pair_id, choice, note, strength, ranking_id = row
            now = now_iso()
            seq = con.execute("SELECT coalesce(max(undo_seq), 0) + 1 FROM assignments").fetchone()[0]
            if ranking_id is None:
                con.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now, label_id))
                pair_ids = [pair_id]
                undone: dict[str, Any] = {
                    "kind": "pair", "label_id": label_id, "pair_id": pair_id, "choice": choice,
                    "strength": strength, "note": note,
                }  # fmt: skip
            else:
                prompt_id, order_json, note = con.execute(
                    "SELECT prompt_id, order_json, note FROM rankings WHERE id = ?", (ranking_id,)
                ).fetchone()
                pair_ids = [r[0] for r in con.execute("SELECT pair_id FROM labels WHERE ranking_id = ?", (ranking_id,))]
                con.execute("UPDATE rankings SET undone_at = ? WHERE id = ?", (now, ranking_id))
                con.execute(
                    "UPDATE labels SET undone_at = ? WHERE ranking_id = ? AND undone_at IS NULL", (now, ranking_id)
                )
                undone = {
                    "kind": "rank", "ranking_id": ranking_id, "prompt_id": prompt_id,
                    "order": json.loads(order_json), "note": note,
                }  # fmt: skip
            con.executemany(
                "UPDATE assignments SET assigned_at = ?, undo_seq = ? WHERE pair_id = ? AND labeler_id = ?",
                [(time.time(), seq, pid, labeler.id) for pid in pair_ids],
            )
        return undone

    def label_rows(self, gold: bool = False) -> list[LabelRow]:
        """Every live label on a pair to label (``gold``: on a gold pair instead), oldest first, with its
        pair's texts and the outcome in import order."""
        with self._read() as con:
            judge = _meta(con, "judge")
            rows = con.execute(
                f"""
                SELECT l.id, l.pair_id, lb.name, l.choice, l.left_id = p.first_id, l.created_at, l.note,
                       pr.prompt_json, pr.extra_json, c1.text, c2.text, c1.model, c2.model,
                       l.strength, l.ranking_id, l.guidelines_hash, l.seconds, p.gold, j1.score, j2.score
                FROM labels l
                JOIN labelers lb ON lb.id = l.labeler_id
                JOIN pairs p ON p.id = l.pair_id
                JOIN prompts pr ON pr.id = p.prompt_id
                JOIN completions c1 ON c1.id = p.first_id
                JOIN completions c2 ON c2.id = p.second_id
                LEFT JOIN judge_scores j1 ON j1.completion_id = p.first_id AND j1.judge = :judge
                LEFT JOIN judge_scores j2 ON j2.completion_id = p.second_id AND j2.judge = :judge
                WHERE l.undone_at IS NULL AND p.gold IS {"NOT NULL" if gold else "NULL"}
                ORDER BY l.id
                """,
                {"judge": judge},
            ).fetchall()
        out = []
        for lid, pid, name, choice, left_first, created, note, pj, ej, t1, t2, m1, m2, *more in rows:
            strength, ranking_id, digest, seconds, gold_winner, s1, s2 = more
            judged = None if s1 is None or s2 is None else ("tie" if s1 == s2 else "first" if s1 > s2 else "second")
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
                    strength=strength,
                    ranking_id=ranking_id,
                    guidelines_sha256=digest,
                    seconds=seconds,
                    gold=gold_winner,
                    judge_outcome=judged,
                )
            )
        return out

    def stats(self) -> dict[str, Any]:
        """``rlhf label stats`` as a dict (the admin page shows the same)."""
        from rlhfkit.labeling.stats import summarize

        with self._read() as con:
            total = con.execute("SELECT count(*) FROM pairs WHERE gold IS NULL").fetchone()[0]
            names = [r[0] for r in con.execute("SELECT name FROM labelers ORDER BY id")]
            revoked = {r[0] for r in con.execute("SELECT name FROM labelers WHERE revoked_at IS NOT NULL")}
            judge = _meta(con, "judge")
            mode = _meta(con, "mode") or "pair"
        return summarize(
            self.label_rows(),
            total_pairs=total,
            overlap=self.overlap,
            labelers=names,
            revoked=revoked,
            gold_labels=self.label_rows(gold=True),
            judge=judge,
            mode=mode,
        )


def _meta(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _put_meta(con: sqlite3.Connection, key: str, value: str) -> None:
    con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def _acknowledged(con: sqlite3.Connection, labeler_id: int) -> bool:
    current = _meta(con, "guidelines_sha256")
    if current is None:
        return True
    return (
        con.execute(
            "SELECT 1 FROM acknowledgements WHERE labeler_id = ? AND guidelines_hash = ?", (labeler_id, current)
        ).fetchone()
        is not None
    )


def _rank_completions(con: sqlite3.Connection, prompt_id: int) -> list[tuple[int, str]]:
    """(id, text) of the completions a ranking of this prompt orders: those in its pairs to label."""
    return con.execute(
        """
        SELECT c.id, c.text FROM completions c WHERE c.prompt_id = ? AND EXISTS
            (SELECT 1 FROM pairs p WHERE p.gold IS NULL AND c.id IN (p.first_id, p.second_id))
        ORDER BY c.id
        """,
        (prompt_id,),
    ).fetchall()


def _shown_order(labeler_id: int, completion_ids: list[int]) -> list[int]:
    """The order a labeler sees a prompt's completions in: shuffled per labeler, the same on every reload."""
    return sorted(completion_ids, key=lambda cid: hashlib.sha256(f"{labeler_id}:{cid}".encode()).digest())


# A gold pair is drawn with this generator; tests may seed it.
_GOLD_DRAW = random.Random()

# This labeler's unlabelled assignments (:me is the first parameter), the most recently undone first.
_OWN_OPEN_SQL = """
SELECT a.pair_id, p.prompt_id FROM assignments a JOIN pairs p ON p.id = a.pair_id
WHERE a.labeler_id = ? AND NOT EXISTS (
    SELECT 1 FROM labels l
    WHERE l.pair_id = a.pair_id AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL)
ORDER BY a.undo_seq IS NULL, a.undo_seq DESC, a.assigned_at, a.pair_id
"""

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
    JOIN pairs hp ON hp.id = a.pair_id AND hp.gold IS NULL
    LEFT JOIN labels l ON l.pair_id = a.pair_id AND l.labeler_id = a.labeler_id AND l.undone_at IS NULL
    GROUP BY a.pair_id
)
"""

# Per prompt (rank mode): held as much as its most held pair, mine if any of its pairs is; {keys}: order keys.
_PROMPTS_HELD_SQL = (
    _HELD_SQL
    + """, pt AS (
    SELECT p.prompt_id AS prompt_id, max(coalesce(h.taken, 0)) AS taken, max(coalesce(h.mine, 0)) AS mine, {keys}
    FROM pairs p LEFT JOIN held h ON h.pair_id = p.id
    WHERE p.gold IS NULL GROUP BY p.prompt_id HAVING count(*) > 0
)
SELECT prompt_id FROM pt"""
)


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


def _record(row: LabelRow, outcome: str, extra: dict[str, Any], margin: float = 0.0) -> PreferenceRecord:
    """chosen/rejected from an outcome; a tie or skip keeps the pair's own order and says so."""
    first_wins = outcome != "second"
    chosen, rejected = (row.first, row.second) if first_wins else (row.second, row.first)
    full = _extra(row, first_wins)
    full.update(extra)
    if outcome in ("tie", "skip"):
        full[outcome] = True
    return PreferenceRecord(prompt=row.prompt, chosen=chosen, rejected=rejected, margin=margin, extra=full)


DEFAULT_MARGINS = {"much": 1.0, "slightly": 1 / 3}
"""Bradley-Terry margin per strength: Llama 2's scale (significantly better 1, slightly better 1/3)."""


def gold_accuracy(gold_labels: Iterable[LabelRow]) -> dict[str, dict[str, Any]]:
    """Per labeler: gold pairs answered (a, b or tie; skips left out), answered right, and the share."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in gold_labels:
        if row.outcome == "skip":
            continue
        counts[row.labeler][0] += 1
        counts[row.labeler][1] += row.outcome == row.gold
    return {
        name: {"answered": n, "correct": right, "accuracy": right / n if n else None}
        for name, (n, right) in counts.items()
    }


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
    min_gold_accuracy: float | None = None,
    margins: dict[str, float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference rows and counts of what was left out.

    ``min_gold_accuracy``: labels of labelers whose gold accuracy is below it, or who answered no
    gold pair, are left out first. A label with a strength gets ``strength`` and a ``margin`` from
    ``margins`` (default ``DEFAULT_MARGINS``); under majority, the mean margin of the winning votes.
    Labels from a ranking carry its ``ranking_id``; every label carries the ``guidelines_sha256``
    in force when it was given (when there were guidelines).

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
    margins = DEFAULT_MARGINS if margins is None else margins
    labels = store.label_rows()
    dropped: Counter[str] = Counter()
    if min_gold_accuracy is not None:
        gold = gold_accuracy(store.label_rows(gold=True))
        kept_labels = []
        for row in labels:
            accuracy = gold.get(row.labeler, {}).get("accuracy")
            if accuracy is None:
                dropped["no_gold_answers"] += 1
            elif accuracy < min_gold_accuracy:
                dropped["low_gold_accuracy"] += 1
            else:
                kept_labels.append(row)
        labels = kept_labels
    by_pair: dict[int, list[LabelRow]] = defaultdict(list)
    for row in labels:
        by_pair[row.pair_id].append(row)
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
            if r.strength:
                extra["strength"] = r.strength
            if r.ranking_id is not None:
                extra["ranking_id"] = r.ranking_id
            if r.guidelines_sha256:
                extra["guidelines_sha256"] = r.guidelines_sha256
            if r.note:
                extra["note"] = r.note
            margin = margins[r.strength] if r.strength else 0.0
            out.append(preference_row(_record(r, r.outcome, extra, margin), fmt))
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
        winning = [r for r in decided if r.outcome == winner]
        strengths = Counter(r.strength for r in winning if r.strength)
        if strengths:
            extra["strength"] = strengths.most_common(1)[0][0]
        rankings = [r.ranking_id for r in decided if r.ranking_id is not None]
        if rankings:
            extra["ranking_ids"] = rankings
        digests = sorted({r.guidelines_sha256 for r in decided if r.guidelines_sha256})
        if digests:
            extra["guidelines_sha256"] = digests[0] if len(digests) == 1 else digests
        notes = [f"{r.labeler}: {r.note}" for r in decided if r.note]
        if notes:
            extra["notes"] = notes
        margin = sum(margins[r.strength] if r.strength else 0.0 for r in winning) / len(winning)
        out.append(preference_row(_record(rows[0], winner, extra, round(margin, 6)), fmt))
    return out, dict(dropped)

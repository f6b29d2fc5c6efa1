"""What a real labeling campaign needs, without a browser: rankings, strength, gold pairs, guidelines,
selection order, per-labeler quality checks and the schema-1 migration.

Each export is checked against the labels given by hand: a ranking of K completions is exactly its
K(K-1)/2 pairs, a strength is exactly its margin, gold pairs never leave the database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from test_labeling_store import invoke, labeler

from rlhfkit.data import CandidateRecord, PreferenceRecord, load_preferences, write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.labeling import store as store_module
from rlhfkit.labeling.server import GUIDELINE_TAGS, create_app, render_guidelines
from rlhfkit.labeling.stats import FAST_WORDS_PER_MINUTE, labeler_quality
from rlhfkit.labeling.store import (
    DEFAULT_MARGINS,
    AlreadyLabeledError,
    BadRankingError,
    GuidelinesChangedError,
    GuidelinesNotAcknowledgedError,
    LabelStore,
    NotAssignedError,
    WrongModeError,
    export_rows,
)

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (id INTEGER PRIMARY KEY, prompt_key TEXT NOT NULL UNIQUE, prompt_json TEXT NOT NULL,
                      extra_json TEXT NOT NULL DEFAULT '{}');
CREATE TABLE completions (id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
                          text TEXT NOT NULL, model TEXT, UNIQUE (prompt_id, text));
CREATE TABLE pairs (id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
                    first_id INTEGER NOT NULL, second_id INTEGER NOT NULL, left_id INTEGER NOT NULL,
                    UNIQUE (first_id, second_id), CHECK (first_id < second_id),
                    CHECK (left_id IN (first_id, second_id)));
CREATE TABLE labelers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
                       created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE assignments (pair_id INTEGER NOT NULL, labeler_id INTEGER NOT NULL, assigned_at REAL NOT NULL,
                          undo_seq INTEGER, PRIMARY KEY (pair_id, labeler_id));
CREATE TABLE labels (id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL, labeler_id INTEGER NOT NULL,
                     choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')), left_id INTEGER NOT NULL,
                     note TEXT, created_at TEXT NOT NULL, undone_at TEXT);
CREATE UNIQUE INDEX labels_one_live ON labels(pair_id, labeler_id) WHERE undone_at IS NULL;
INSERT INTO meta VALUES ('schema_version', '1'), ('overlap', '1');
INSERT INTO prompts VALUES (1, '"Say hi"', '"Say hi"', '{}');
INSERT INTO completions VALUES (1, 1, 'hi', 'm'), (2, 1, 'hello there', 'm');
INSERT INTO pairs VALUES (1, 1, 1, 2, 2);
INSERT INTO labelers VALUES (1, 'ann', 'x', '2026-01-01T00:00:00.000Z', NULL);
INSERT INTO assignments VALUES (1, 1, 0, NULL);
INSERT INTO labels VALUES (1, 1, 1, 'a', 2, NULL, '2026-01-01T00:00:01.000Z', NULL);
"""


def four_way(n: int) -> list[CandidateRecord]:
    return [CandidateRecord(f"prompt {k}", [f"c{k}-{i} " + "word " * i for i in range(4)], "m") for k in range(n)]


# ----------------------------------------------------------------------------------------------
# Rankings


def test_a_ranking_exports_as_exactly_its_pairs_and_undo_brings_it_back(store: LabelStore) -> None:
    store.import_candidates(four_way(2))
    store.set_mode("rank")
    ann = labeler(store, "ann")
    task = store.next_ranking(ann)
    assert task is not None and len(task.completions) == 4
    assert store.next_ranking(ann) == task  # a reload shows the same task in the same order
    shown = [cid for cid, _ in task.completions]
    best_first = [shown[2], shown[0], shown[3], shown[1]]
    text = dict(task.completions)
    ranking_id, created = store.add_ranking(ann, task.prompt_id, best_first, note="c2 is clearest")
    assert created
    assert store.add_ranking(ann, task.prompt_id, best_first, note="c2 is clearest") == (ranking_id, False)
    with pytest.raises(AlreadyLabeledError):
        store.add_ranking(ann, task.prompt_id, list(reversed(best_first)))

    rows, dropped = export_rows(store)
    assert dropped == {}
    expected = {(text[hi], text[lo]) for hi, lo in combinations(best_first, 2)}
    assert {(r["chosen"], r["rejected"]) for r in rows} == expected and len(rows) == 6
    assert {r["ranking_id"] for r in rows} == {ranking_id}
    assert all("margin" not in r and "strength" not in r for r in rows)
    # Position bias reads rankings like pairs: "a" means the one shown higher up won.
    position = {cid: i for i, cid in enumerate(shown)}
    rank = {cid: i for i, cid in enumerate(best_first)}
    for row in store.label_rows():
        ids = {text[c]: c for c in shown}
        first, second = ids[row.first], ids[row.second]
        upper, lower = sorted((first, second), key=position.get)
        assert row.choice == ("a" if rank[upper] < rank[lower] else "b")
    assert store.progress(ann) == {"done": 1, "remaining": 1}
    assert store.stats()["rankings"] == 1 and store.stats()["labels"] == 6

    undone = store.undo(ann)
    assert undone["kind"] == "rank" and undone["order"] == best_first and undone["note"] == "c2 is clearest"
    assert export_rows(store)[0] == [] and store.progress(ann)["done"] == 0
    assert store.next_ranking(ann) == task  # the undone ranking comes back first


def test_rankings_respect_overlap_and_refuse_wrong_orders_and_modes(store: LabelStore) -> None:
    store.import_candidates(four_way(1))
    store.set_overlap(2)
    store.set_mode("rank")
    ann, bob, cid = labeler(store, "ann"), labeler(store, "bob"), labeler(store, "cid")
    task_a, task_b = store.next_ranking(ann), store.next_ranking(bob)
    assert task_a and task_b and task_a.prompt_id == task_b.prompt_id
    assert sorted(task_a.completions) == sorted(task_b.completions)
    assert store.next_ranking(cid) is None  # two labelers hold the only prompt
    ids = [c for c, _ in task_a.completions]
    for bad in (ids[:3], [*ids[:3], ids[0]], [*ids[:3], 999]):
        with pytest.raises(BadRankingError):
            store.add_ranking(ann, task_a.prompt_id, bad)
    with pytest.raises(NotAssignedError):
        store.add_ranking(cid, task_a.prompt_id, ids)
    pair_id = store.label_rows() or store.pairs_to_score()[0][0]
    with pytest.raises(WrongModeError):
        store.add_label(ann, pair_id, "a")
    store.add_ranking(ann, task_a.prompt_id, ids)
    store.add_ranking(bob, task_b.prompt_id, ids)
    stats = store.stats()
    assert stats["pairs_complete"] == 6 and stats["agreement"]["raw"] == 1.0
    assert export_rows(store, aggregate="majority")[0][0]["ranking_ids"] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Strength


def test_strength_becomes_a_margin_in_both_formats_and_under_majority(store: LabelStore) -> None:
    store.import_candidates([CandidateRecord("q", ["x", "y"], "m")])
    store.set_overlap(2)
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    view = store.next_pair(ann)
    assert view is not None and store.next_pair(bob) == view
    with pytest.raises(RlhfkitError, match="strength"):
        store.add_label(ann, view.pair_id, "tie", strength="much")
    store.add_label(ann, view.pair_id, "a", strength="much")
    store.add_label(bob, view.pair_id, "a", strength="slightly")
    rows, _ = export_rows(store)
    assert [(r["strength"], r["margin"]) for r in rows] == [("much", 1.0), ("slightly", DEFAULT_MARGINS["slightly"])]
    assert all(r["chosen"] == view.a for r in rows)
    vertex, _ = export_rows(store, "vertex", margins={"much": 2.0, "slightly": 0.5})
    assert [(r["strength"], r["margin"], r["choice"]) for r in vertex] == [("much", 2.0, 0), ("slightly", 0.5, 0)]
    (row,), _ = export_rows(store, aggregate="majority")
    assert row["margin"] == pytest.approx((1.0 + 1 / 3) / 2, abs=1e-6)
    assert store.stats()["by_strength"] == {"much": 1, "slightly": 1}


def test_exported_margins_reach_the_bradley_terry_loss(store: LabelStore, tmp_path: Path) -> None:
    store.import_candidates([CandidateRecord("q", ["x", "y"], "m")])
    ann = labeler(store, "ann")
    view = store.next_pair(ann)
    assert view is not None
    store.add_label(ann, view.pair_id, "b", strength="much")
    write_jsonl(tmp_path / "prefs.jsonl", export_rows(store)[0])
    (record,) = load_preferences(tmp_path / "prefs.jsonl")
    assert (record.chosen, record.margin, record.extra["strength"]) == (view.b, 1.0, "much")


# ----------------------------------------------------------------------------------------------
# Gold pairs


def gold_store(store: LabelStore, n_real: int = 6) -> list[PreferenceRecord]:
    store.import_candidates([CandidateRecord(f"p{k}", [f"a{k}", f"b{k}"], "m") for k in range(n_real)])
    gold = [PreferenceRecord(f"gold {k}", f"right {k}", f"wrong {k}") for k in range(3)]
    assert store.import_gold(gold) == 3
    assert store.import_gold(gold) == 0
    return gold


def test_gold_pairs_are_served_at_the_rate_scored_and_never_exported(store: LabelStore) -> None:
    gold = gold_store(store)
    assert store.counts()["pairs"] == 6 and store.counts()["gold_pairs"] == 3
    store.set_gold_rate(0.5)
    store_module._GOLD_DRAW.seed(0)
    ann = labeler(store, "ann")
    served_gold = 0
    right = {g.prompt: g.chosen for g in gold}
    while (view := store.next_pair(ann)) is not None:
        if view.prompt in right:
            served_gold += 1
            store.add_label(ann, view.pair_id, "a" if view.a == right[view.prompt] else "b")  # always right
        else:
            store.add_label(ann, view.pair_id, "a")
    assert served_gold == 3  # every gold pair once, while real pairs were left
    assert store.progress(ann) == {"done": 9, "remaining": 0}  # gold counts as done: the labeler can't tell
    rows, _ = export_rows(store)
    assert len(rows) == 6 and not any(r["prompt"].startswith("gold") for r in rows)
    stats = store.stats()
    (ann_stats,) = stats["labelers"]
    assert (ann_stats["gold_answered"], ann_stats["gold_correct"], ann_stats["gold_accuracy"]) == (3, 3, 1.0)
    assert stats["pairs"] == 6 and stats["gold_labels"] == 3


def test_min_gold_accuracy_drops_careless_labelers_and_those_without_gold(store: LabelStore) -> None:
    gold = gold_store(store, n_real=2)
    store.set_overlap(3)
    right = {g.prompt: g.chosen for g in gold}
    store.set_gold_rate(0.999)
    store_module._GOLD_DRAW.seed(1)
    for name, answer_right in (("good", True), ("careless", False)):
        who = labeler(store, name)
        while (view := store.next_pair(who)) is not None:
            if view.prompt in right:
                wins_a = (view.a == right[view.prompt]) == answer_right
                store.add_label(who, view.pair_id, "a" if wins_a else "b")
            else:
                store.add_label(who, view.pair_id, "a")
    store.set_gold_rate(0.0)
    late = labeler(store, "late")  # no gold answered
    while (view := store.next_pair(late)) is not None:
        store.add_label(late, view.pair_id, "a")
    rows, dropped = export_rows(store, min_gold_accuracy=0.8)
    assert {r["labeler"] for r in rows} == {"good"} and len(rows) == 2
    assert dropped == {"low_gold_accuracy": 2, "no_gold_answers": 2}
    accuracy = {lb["name"]: lb["gold_accuracy"] for lb in store.stats()["labelers"]}
    assert accuracy == {"good": 1.0, "careless": 0.0, "late": None}


def test_page_ids_are_random_so_gold_pairs_imported_apart_do_not_stand_out(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.db")
    gold_store(store, n_real=6)  # stored ids 1-6 real, 7-9 gold
    store.set_gold_rate(0.5)
    store_module._GOLD_DRAW.seed(0)
    auth = {"Authorization": f"Bearer {store.add_labeler('ann')}"}
    client = TestClient(create_app(store.path))
    shown = []
    while (task := client.get("/api/next", headers=auth)).status_code == 200:
        shown.append(task.json()["pair_id"])
        client.post("/api/label", json={"pair_id": shown[-1], "choice": "a"}, headers=auth)
    stored = [store.pair_id_for(public) for public in shown]
    assert sorted(stored) == list(range(1, 10))  # every pair, gold included, labelled through its page id
    assert all(public > 1000 for public in shown) and sorted(shown) != shown  # random, not import order
    assert len(store.label_rows()) == 6 and len(store.label_rows(gold=True)) == 3
    undone = client.post("/api/undo", headers=auth).json()["undone"]
    assert undone["pair_id"] == shown[-1]


def test_a_gold_pair_equal_to_a_pair_to_label_is_refused(store: LabelStore) -> None:
    store.import_candidates([CandidateRecord("p", ["a", "b"], "m")])
    with pytest.raises(RlhfkitError, match="row 2: this pair is also a pair to label"):
        store.import_gold([PreferenceRecord("q", "x", "y"), PreferenceRecord("p", "b", "a")], source="gold.jsonl")
    assert store.counts()["gold_pairs"] == 0  # one transaction: nothing of the file was kept


# ----------------------------------------------------------------------------------------------
# Guidelines


def test_guidelines_must_be_acknowledged_and_their_hash_goes_with_every_label(store: LabelStore) -> None:
    store.import_candidates([CandidateRecord(f"p{k}", ["x", "y"], "m") for k in range(2)])
    ann = labeler(store, "ann")
    assert store.has_acknowledged(ann)  # no guidelines: nothing to acknowledge
    first = store.set_guidelines("# Criteria\n\nPrefer the less toxic answer.")
    view = store.next_pair(ann)
    assert view is not None and not store.has_acknowledged(ann)
    with pytest.raises(GuidelinesNotAcknowledgedError):
        store.add_label(ann, view.pair_id, "a")
    with pytest.raises(GuidelinesChangedError):
        store.acknowledge(ann, "0" * 64)
    store.acknowledge(ann, first)
    store.add_label(ann, view.pair_id, "a")
    second = store.set_guidelines("# Criteria\n\nPrefer the less toxic answer; if both are clean, the more helpful.")
    assert second != first and not store.has_acknowledged(ann)
    view = store.next_pair(ann)
    assert view is not None
    with pytest.raises(GuidelinesNotAcknowledgedError):
        store.add_label(ann, view.pair_id, "b")
    store.acknowledge(ann, second)
    store.add_label(ann, view.pair_id, "b")
    assert [r["guidelines_sha256"] for r in export_rows(store)[0]] == [first, second]


def test_the_api_answers_428_until_the_guidelines_are_acknowledged(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates([CandidateRecord("p", ["x", "y"], "m")])
    digest = store.set_guidelines("Be **kind**.\n\n<script>window.pwned = 1</script>")
    auth = {"Authorization": f"Bearer {store.add_labeler('ann')}"}
    client = TestClient(create_app(store.path))
    assert client.get("/api/next", headers=auth).status_code == 428
    shown = client.get("/api/guidelines", headers=auth).json()
    assert shown["sha256"] == digest and not shown["acknowledged"]
    assert "<strong>kind</strong>" in shown["html"] and "<script" not in shown["html"]
    assert client.post("/api/acknowledge", json={"sha256": "f" * 64}, headers=auth).status_code == 409
    assert client.post("/api/acknowledge", json={"sha256": digest}, headers=auth).status_code == 200
    task = client.get("/api/next", headers=auth).json()
    assert task["kind"] == "pair"
    body = {"pair_id": task["pair_id"], "choice": "tie", "strength": "much"}
    assert client.post("/api/label", json=body, headers=auth).status_code == 422
    body["choice"] = "a"
    assert client.post("/api/label", json=body, headers=auth).status_code == 200


def test_rank_mode_over_http(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates(four_way(1))
    store.set_mode("rank")
    auth = {"Authorization": f"Bearer {store.add_labeler('ann')}"}
    client = TestClient(create_app(store.path))
    task = client.get("/api/next", headers=auth).json()
    assert task["kind"] == "rank" and len(task["completions"]) == 4
    order = [c["id"] for c in task["completions"]]
    assert client.post("/api/label", json={"pair_id": 1, "choice": "a"}, headers=auth).status_code == 409
    short = client.post("/api/rank", json={"prompt_id": task["prompt_id"], "order": order[:3]}, headers=auth)
    assert short.status_code == 422 and "each of the prompt's 4 completion ids" in short.json()["detail"]
    not_an_object = client.post("/api/rank", json=[1, 2], headers=auth).json()["detail"]
    assert not_an_object == 'body: expected a JSON object {"prompt_id", "order", "note"?}'
    done = client.post("/api/rank", json={"prompt_id": task["prompt_id"], "order": order}, headers=auth)
    assert done.status_code == 200 and done.json()["progress"] == {"done": 1, "remaining": 0}
    assert client.get("/api/next", headers=auth).status_code == 204
    undone = client.post("/api/undo", headers=auth).json()["undone"]
    assert undone["kind"] == "rank" and undone["order"] == order


@pytest.mark.parametrize(
    "markdown",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "[click](javascript:alert(1))",
        '<a href="javascript:alert(1)">x</a>',
        "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
        "<iframe src=https://example.com></iframe>",
    ],
)
def test_rendered_guidelines_hold_no_active_content(markdown: str) -> None:
    from html.parser import HTMLParser

    class Elements(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.found.append((tag, attrs))

    parsed = Elements()
    parsed.feed(render_guidelines(markdown))
    for tag, attrs in parsed.found:  # what a browser would build: only inert tags, only http(s) links
        assert tag in GUIDELINE_TAGS
        for name, value in attrs:
            assert not name.startswith("on")
            if name == "href":
                assert (value or "").startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------
# Selection order


def test_select_orders_new_pairs(store: LabelStore) -> None:
    store.import_candidates([CandidateRecord(f"p{k}", ["x", "y"], "m") for k in range(20)])
    ids = [pid for pid, *_ in store.pairs_to_score()]

    def served(select: str) -> list[int]:
        store.set_select(select)
        who = labeler(store, f"{select}-{len(store.list_labelers())}")
        out = []
        while (view := store.next_pair(who)) is not None:
            out.append(view.pair_id)
            store.add_label(who, view.pair_id, "skip")  # a skip frees the pair for the next labeler
        return out

    assert served("order") == ids
    shuffled = served("random")
    assert sorted(shuffled) == ids and shuffled != ids
    assert served("random") == shuffled  # the random order is drawn once, at import
    store.set_uncertainty({ids[5]: 0.01, ids[2]: 0.3, ids[9]: 0.0})
    uncertain = served("uncertain")
    assert uncertain[:3] == [ids[9], ids[5], ids[2]]
    assert uncertain[3:] == [i for i in shuffled if i not in (ids[9], ids[5], ids[2])]


# ----------------------------------------------------------------------------------------------
# Labeler quality


def row(labeler: str, pair: int, outcome: str, **kw: object) -> SimpleNamespace:
    fields = {
        "label_id": pair * 100 + len(labeler), "pair_id": pair, "labeler": labeler, "outcome": outcome,
        "choice": {"first": "a", "second": "b"}.get(outcome, outcome), "seconds": None, "ranking_id": None,
        "prompt": "one two three", "first": "four five", "second": "six seven", "judge_outcome": None,
        "strength": None, "gold": None, "created_at": "t",
    }  # fmt: skip
    fields.update(kw)
    return SimpleNamespace(**fields)


def test_quality_agreement_with_others_and_judge_hand_computed() -> None:
    # pairs 1-4: ann and two others; the others' majority is first, first, second, (split: not counted)
    labels = [
        row("ann", 1, "first", judge_outcome="first"),
        row("ann", 2, "second", judge_outcome="first"),
        row("ann", 3, "second", judge_outcome="second"),
        row("ann", 4, "first", judge_outcome="first"),
        row("bob", 1, "first"), row("cid", 1, "first"),
        row("bob", 2, "first"), row("cid", 2, "first"),
        row("bob", 3, "second"), row("cid", 3, "tie"),
        row("bob", 4, "first"), row("cid", 4, "second"),
    ]  # fmt: skip
    quality = labeler_quality(labels, judge="nontoxic")
    ann = quality["ann"]
    # ann vs others' majority on pairs 1-3: (first, first), (second, first), (second, tie -> no majority) ...
    # pair 3's others are second/tie: a split, so only pairs 1 and 2 count
    assert ann["shared_with_others"] == 2 and ann["agreement_with_others"] == 0.5
    # kappa of ann (first, second) vs others (first, first): p_o = 0.5, p_e = 0.5 * 1 + 0.5 * 0 = 0.5 -> 0
    assert ann["kappa_with_others"] == 0.0
    assert ann["judge_pairs"] == 4 and ann["judge_agreement"] == 0.75
    assert quality["bob"]["judge_agreement"] is None


def test_quality_flags_fast_and_one_sided_labelers() -> None:
    words = 3 + 2 + 2  # prompt, first, second
    fast = [row("fast", k, "first", seconds=words * 60 / (2 * FAST_WORDS_PER_MINUTE)) for k in range(12)]
    careful = [row("careful", k, "first" if k % 2 else "second", seconds=20.0) for k in range(12)]
    quality = labeler_quality(fast + careful)
    assert quality["fast"]["median_words_per_minute"] == pytest.approx(2 * FAST_WORDS_PER_MINUTE)
    assert any(f.startswith("faster than reading") for f in quality["fast"]["flags"])
    assert any(f.startswith("picks A") for f in quality["fast"]["flags"])  # always the left one
    assert quality["careful"]["flags"] == [] and quality["careful"]["left_share"] == 0.5
    few = labeler_quality(fast[:3])  # too few tasks to say anything
    assert few["fast"]["flags"] == []


def test_seconds_per_label_are_stored_and_a_ranking_is_one_task(store: LabelStore) -> None:
    store.import_candidates(four_way(1))
    store.set_mode("rank")
    ann = labeler(store, "ann")
    task = store.next_ranking(ann)
    assert task is not None
    store.add_ranking(ann, task.prompt_id, [c for c, _ in task.completions])
    rows = store.label_rows()
    assert len({r.seconds for r in rows}) == 1 and rows[0].seconds is not None and rows[0].seconds >= 0


# ----------------------------------------------------------------------------------------------
# Migration and commands


def test_a_schema_1_database_is_migrated_in_place_and_keeps_its_labels(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(V1_SCHEMA)
    con.close()
    store = LabelStore(path)
    assert store.get_meta("schema_version") == "2"
    (row,) = export_rows(store)[0]
    assert (row["chosen"], row["rejected"], row["labeler"]) == ("hello there", "hi", "ann")
    assert "strength" not in row and "guidelines_sha256" not in row
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM pairs WHERE shuffle_key = 0 OR public_id IS NULL").fetchone()[0] == 0
    con.close()
    assert LabelStore(path).counts()["pairs"] == 1  # opening again changes nothing


def test_serve_flags_set_up_the_campaign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhfkit.labeling import commands

    cands, gold, guide = tmp_path / "cands.jsonl", tmp_path / "gold.jsonl", tmp_path / "guide.md"
    write_jsonl(cands, [{"prompt": f"p{k}", "completions": ["x", "y", "z"], "model": "m"} for k in range(3)])
    write_jsonl(gold, [{"prompt": "g", "chosen": "kind", "rejected": "rude"}])
    guide.write_text("Prefer the **less toxic** answer.", encoding="utf-8")
    db = tmp_path / "labels.db"
    cfg = commands.LabelServeConfig(db=str(db), candidates=str(cands), guidelines=str(guide), gold=str(gold))
    prepared = commands.prepare_serve(cfg)
    store = prepared["store"]
    assert store.counts() == {"prompts": 4, "completions": 11, "pairs": 9, "gold_pairs": 1}
    assert store.gold_rate == 0.1 and store.guidelines()[0] == "Prefer the **less toxic** answer."
    assert prepared["summary"]["mode"] == "pair"
    with pytest.raises(RlhfkitError, match="pair mode only"):
        commands.prepare_serve(commands.LabelServeConfig(db=str(db), mode="rank"))
    with pytest.raises(ValueError, match="needs --reward-model"):
        commands.LabelServeConfig(db=str(db), select="uncertain")
    big = tmp_path / "big.jsonl"
    write_jsonl(big, [{"prompt": "wide", "completions": [f"c{i}" for i in range(17)]}])
    with pytest.raises(RlhfkitError, match="17 completions to rank; at most 16"):
        commands.prepare_serve(
            commands.LabelServeConfig(db=str(tmp_path / "wide.db"), candidates=str(big), mode="rank")
        )
    code, out = invoke("serve", "--db", db, "--guidelines", tmp_path / "missing.md")
    assert code == 2 and "missing.md: no such file" in out


def test_stats_with_a_judge_stores_its_scores_and_compares(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates([CandidateRecord("p", ["you are an idiot", "have a nice day"], "m")])
    ann = labeler(store, "ann")
    view = store.next_pair(ann)
    assert view is not None
    store.add_label(ann, view.pair_id, "a" if view.a == "have a nice day" else "b")
    code, out = invoke("stats", "--db", store.path, "--judge", "nontoxic", "--out", tmp_path / "s.json")
    assert code == 0, out
    stats = json.loads((tmp_path / "s.json").read_text())
    (ann_stats,) = stats["labelers"]
    assert stats["judge"] == "nontoxic" and ann_stats["judge_agreement"] == 1.0
    assert "labeler quality" in out


def test_rankings_train_a_reward_model_with_each_ranking_in_one_batch(
    store: LabelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Label -> export -> reward training: the batches the trainer takes keep every ranking whole."""
    from rlhfkit import reward

    store.import_candidates(four_way(8))
    store.set_mode("rank")
    ann = labeler(store, "ann")
    while (task := store.next_ranking(ann)) is not None:  # rank by length: longest first
        store.add_ranking(ann, task.prompt_id, [c for c, _ in sorted(task.completions, key=lambda c: -len(c[1]))])
    write_jsonl(tmp_path / "prefs.jsonl", export_rows(store)[0])
    seen: list[list[int]] = []
    real = reward.PromptGroupedBatches.epoch_batches

    def recording(self: reward.PromptGroupedBatches, epoch: int, skip: int = 0) -> Iterator[list[int]]:
        for batch in real(self, epoch, skip):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(reward.PromptGroupedBatches, "epoch_batches", recording)
    cfg = reward.RewardTrainConfig(
        data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / "rm"), model="tiny-random", trainable_layers=1,
        epochs=1, batch_size=8, eval_fraction=0.25,
    )  # fmt: skip
    reward.train_reward_model(cfg, show_summary=False)
    records = load_preferences(tmp_path / "prefs.jsonl")
    assert len({i for batch in seen for i in batch}) == 36  # 6 of the 8 rankings are trained on, 6 pairs each
    for batch in seen:
        assert len({records[i].extra["ranking_id"] for i in batch}) * 6 == len(batch)


def test_serve_select_uncertain_scores_every_pair_with_the_reward_model(tmp_path: Path) -> None:
    from rlhfkit.labeling import commands
    from rlhfkit.reward import RewardTrainConfig, reward_dir_uncertainty, train_reward_model

    rows = [{"prompt": f"Item {i}", "chosen": "kind warm " * (i % 3 + 1), "rejected": "cold cruel"} for i in range(16)]
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    rm = tmp_path / "rm"
    cfg = RewardTrainConfig(
        data=str(tmp_path / "prefs.jsonl"), out=str(rm), model="tiny-random", lora_r=0, epochs=0, head_init="probe"
    )
    train_reward_model(cfg, show_summary=False)
    write_jsonl(
        tmp_path / "cands.jsonl",
        [{"prompt": f"q{k}", "completions": ["kind " * k, "cold " * k, "warm"]} for k in range(1, 4)],
    )
    serve = commands.LabelServeConfig(
        db=str(tmp_path / "labels.db"),
        candidates=str(tmp_path / "cands.jsonl"),
        select="uncertain",
        reward_model=str(rm),
    )
    prepared = commands.prepare_serve(serve)
    store = prepared["store"]
    assert store.select == "uncertain" and prepared["summary"]["pairs scored by the reward model"] == 9
    pairs = store.pairs_to_score()
    want = reward_dir_uncertainty(rm, [(p, a, b) for _, p, a, b in pairs])
    con = sqlite3.connect(store.path)
    got = [u for (u,) in con.execute("SELECT uncertainty FROM pairs ORDER BY id")]
    con.close()
    assert got == pytest.approx(want) and len(set(want)) == len(want)
    ann = labeler(store, "ann")
    view = store.next_pair(ann)
    assert view is not None and view.pair_id == pairs[min(range(9), key=want.__getitem__)][0]

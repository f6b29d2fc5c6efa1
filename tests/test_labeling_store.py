"""The labeling database, statistics and export, without a server.

Pairing, idempotent import, assignment with overlap (and leases, skips, revocation), undo, tokens,
agreement statistics against hand-computed values, and export in both preference formats; the
``rlhf label`` commands through ``register`` on a fresh Typer app.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.data import CandidateRecord, load_preferences
from rlhfkit.errors import RlhfkitError
from rlhfkit.labeling.commands import register
from rlhfkit.labeling.stats import (
    binomial_two_sided_p,
    cohen_kappa,
    fleiss_kappa,
    position_bias,
    raw_agreement,
    wilson_interval,
)
from rlhfkit.labeling.store import (
    AlreadyLabeledError,
    Labeler,
    LabelStore,
    NotAssignedError,
    NothingToUndoError,
    export_rows,
    form_pairs,
    hash_token,
    majority,
)


def labeler(store: LabelStore, name: str) -> Labeler:
    found = store.labeler_for_token(store.add_labeler(name))
    assert found is not None
    return found


def two_way(n: int) -> list[CandidateRecord]:
    """n prompts with two completions each: exactly n pairs, pair k+1 from prompt k."""
    return [CandidateRecord(f"prompt {k}", [f"first {k}", f"second {k}"], "m") for k in range(n)]


def choice_for(store: LabelStore, who: Labeler, outcome: str) -> tuple[int, str]:
    """Get the next pair and the shown choice (a/b) that makes its first completion win, or tie."""
    view = store.next_pair(who)
    assert view is not None
    if outcome == "tie":
        return view.pair_id, "tie"
    first_is_left = view.a.startswith("first")
    return view.pair_id, "a" if (outcome == "first") == first_is_left else "b"


# ----------------------------------------------------------------------------------------------
# Pairing and import


def test_form_pairs_skips_empty_and_identical_texts() -> None:
    assert form_pairs(["a", "b", "c"]) == [(0, 1), (0, 2), (1, 2)]
    assert form_pairs(["a", "b", "a ", "", "  ", "c"]) == [(0, 1), (0, 5), (1, 5)]
    assert form_pairs(["same", "same"]) == []
    assert form_pairs(["only"]) == []


def test_import_is_idempotent_and_extends_prompts(store: LabelStore) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    records = [
        CandidateRecord("Tell a joke", ["j1", "j2", "j3", "j2"], "m1", {"id": 7}),
        CandidateRecord(chat, ["hello", "hey"], "m1"),
        CandidateRecord("Nothing to compare", ["x", "x"], "m1"),
    ]
    first = store.import_candidates(records)
    assert (first.prompts_added, first.completions_added, first.pairs_added) == (3, 6, 4)
    assert first.prompts_without_pairs == 1
    again = store.import_candidates(records)
    assert (again.prompts_added, again.completions_added, again.pairs_added, again.pairs_total) == (0, 0, 0, 4)
    # A new completion for a known prompt pairs with the ones already there (and a new model is kept).
    more = store.import_candidates([CandidateRecord("Tell a joke", ["j1", "j4"], "m2")])
    assert (more.prompts_added, more.completions_added, more.pairs_added, more.pairs_total) == (0, 1, 3, 7)
    assert store.counts() == {"prompts": 3, "completions": 7, "pairs": 7, "gold_pairs": 0}


def test_chat_prompt_round_trips_and_sides_are_random_but_stored(store: LabelStore) -> None:
    texts = [f"completion {i}" for i in range(12)]  # 66 pairs: both sides surely occur
    chat = [{"role": "user", "content": "Which?"}]
    store.import_candidates([CandidateRecord(chat, texts, None)])
    with sqlite3.connect(store.path) as con:
        sides = con.execute("SELECT left_id = first_id FROM pairs").fetchall()
    assert {s for (s,) in sides} == {0, 1}
    ann = labeler(store, "ann")
    view = store.next_pair(ann)
    assert view is not None and view.prompt == chat
    again = store.next_pair(ann)  # a reload shows the same pair, same sides
    assert again == view


# ----------------------------------------------------------------------------------------------
# Assignment


def drain(store: LabelStore, labelers: list[Labeler], choice: str = "a", **kw: float) -> dict[str, list[int]]:
    """Round-robin next/label until every labeler gets None; the pairs each labeler was given."""
    seen: dict[str, list[int]] = {lb.name: [] for lb in labelers}
    active = list(labelers)
    while active:
        for who in list(active):
            view = store.next_pair(who, **kw)
            if view is None:
                active.remove(who)
                continue
            seen[who.name].append(view.pair_id)
            store.add_label(who, view.pair_id, choice)
    return seen


@pytest.mark.parametrize("overlap", [1, 2, 3])
def test_overlap_gives_each_pair_to_k_labelers_never_twice_to_one(store: LabelStore, overlap: int) -> None:
    store.import_candidates(two_way(7))
    store.set_overlap(overlap)
    labelers = [labeler(store, n) for n in ("ann", "bob", "cy", "dee")]
    seen = drain(store, labelers)
    for pairs in seen.values():
        assert len(pairs) == len(set(pairs))  # never the same pair twice
    per_pair = Counter(p for pairs in seen.values() for p in pairs)
    assert per_pair == {p: overlap for p in range(1, 8)}
    assert len(store.label_rows()) == 7 * overlap


def test_overlap_larger_than_labeler_count_stops_cleanly(store: LabelStore) -> None:
    store.import_candidates(two_way(3))
    store.set_overlap(5)
    seen = drain(store, [labeler(store, "ann"), labeler(store, "bob")])
    assert sorted(seen["ann"]) == sorted(seen["bob"]) == [1, 2, 3]


def test_skip_frees_the_slot_for_another_labeler(store: LabelStore) -> None:
    store.import_candidates(two_way(1))
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    view = store.next_pair(ann)
    assert view is not None
    assert store.next_pair(bob) is None  # overlap 1: held by ann
    store.add_label(ann, view.pair_id, "skip")
    assert store.next_pair(ann) is None  # ann never gets it again
    again = store.next_pair(bob)
    assert again is not None and again.pair_id == view.pair_id


def test_lease_releases_abandoned_pairs_and_revocation_frees_them(store: LabelStore) -> None:
    store.import_candidates(two_way(2))
    ann, bob, cy = labeler(store, "ann"), labeler(store, "bob"), labeler(store, "cy")
    first = store.next_pair(ann)
    assert first is not None and first.pair_id == 1
    assert store.next_pair(bob, lease_seconds=600).pair_id == 2  # type: ignore[union-attr]
    assert store.next_pair(cy, lease_seconds=600) is None
    with sqlite3.connect(store.path) as con:  # ann walked away an hour ago
        con.execute("UPDATE assignments SET assigned_at = assigned_at - 3600 WHERE labeler_id = ?", (ann.id,))
    assert store.next_pair(cy, lease_seconds=0) is None  # lease 0: held for ever
    assert store.next_pair(cy, lease_seconds=600).pair_id == 1  # type: ignore[union-attr]
    # Revoking bob frees his unlabelled pair at once; his token stops working.
    dee = labeler(store, "dee")
    store.revoke("bob")
    assert store.next_pair(dee).pair_id == 2  # type: ignore[union-attr]
    with pytest.raises(NotAssignedError):
        store.add_label(bob, 2, "a")
    # ann's late label on her expired assignment is still accepted: nothing a labeler did is lost.
    store.add_label(ann, 1, "b")
    assert [r.labeler for r in store.label_rows()] == ["ann"]


# ----------------------------------------------------------------------------------------------
# Labels and undo


def test_add_label_checks_assignment_and_is_idempotent(store: LabelStore) -> None:
    store.import_candidates(two_way(2))
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    view = store.next_pair(ann)
    assert view is not None
    with pytest.raises(NotAssignedError):
        store.add_label(bob, view.pair_id, "a")
    with pytest.raises(NotAssignedError):
        store.add_label(ann, 999, "a")
    label_id, created = store.add_label(ann, view.pair_id, "a", "  because  ")
    assert created
    assert store.add_label(ann, view.pair_id, "a", "because") == (label_id, False)  # a retry
    with pytest.raises(AlreadyLabeledError):
        store.add_label(ann, view.pair_id, "b")
    with pytest.raises(RlhfkitError, match="choice"):
        store.add_label(ann, view.pair_id, "left")
    with pytest.raises(RlhfkitError, match="note"):
        store.add_label(ann, view.pair_id, "a", "x" * 2001)
    assert len(store.label_rows()) == 1 and store.label_rows()[0].note == "because"


def test_undo_brings_pairs_back_most_recent_first(store: LabelStore) -> None:
    store.import_candidates(two_way(4))
    ann = labeler(store, "ann")
    with pytest.raises(NothingToUndoError):
        store.undo(ann)
    given = []
    for choice in ("a", "b", "tie"):
        view = store.next_pair(ann)
        assert view is not None
        store.add_label(ann, view.pair_id, choice, f"note {choice}")
        given.append(view.pair_id)
    shown = store.next_pair(ann)  # pair 4 is on screen when the labeler presses undo twice
    assert shown is not None and shown.pair_id == 4
    assert store.undo(ann)["pair_id"] == given[2]
    undone = store.undo(ann)
    assert (undone["pair_id"], undone["choice"], undone["note"]) == (given[1], "b", "note b")
    assert store.next_pair(ann).pair_id == given[1]  # type: ignore[union-attr]
    store.add_label(ann, given[1], "a")
    assert store.next_pair(ann).pair_id == given[2]  # type: ignore[union-attr]
    store.add_label(ann, given[2], "b")
    assert store.next_pair(ann).pair_id == 4  # type: ignore[union-attr]
    rows = store.label_rows()
    assert [(r.pair_id, r.choice) for r in rows] == [(given[0], "a"), (given[1], "a"), (given[2], "b")]
    with sqlite3.connect(store.path) as con:  # undone labels are kept as an audit trail
        assert con.execute("SELECT count(*) FROM labels WHERE undone_at IS NOT NULL").fetchone()[0] == 2
    assert store.progress(ann) == {"done": 3, "remaining": 1}


def test_a_doubled_live_label_is_impossible_in_the_schema(store: LabelStore) -> None:
    store.import_candidates(two_way(1))
    ann = labeler(store, "ann")
    store.next_pair(ann)
    store.add_label(ann, 1, "a")
    with sqlite3.connect(store.path) as con, pytest.raises(sqlite3.IntegrityError):
        con.execute(
            "INSERT INTO labels (pair_id, labeler_id, choice, left_id, created_at) VALUES (1, ?, 'b', 1, 'now')",
            (ann.id,),
        )


# ----------------------------------------------------------------------------------------------
# Tokens


def test_tokens_are_random_hashed_revocable_and_reissuable(store: LabelStore) -> None:
    token = store.add_labeler("ann")
    other = store.add_labeler("bob")
    assert token != other and len(token) >= 40
    assert store.labeler_for_token(token).name == "ann"  # type: ignore[union-attr]
    assert store.labeler_for_token(token + "x") is None
    files = [p for p in (store.path, Path(f"{store.path}-wal")) if p.exists()]
    assert not any(token.encode() in p.read_bytes() for p in files)
    assert any(hash_token(token).encode() in p.read_bytes() for p in files)
    with pytest.raises(RlhfkitError, match="already exists"):
        store.add_labeler("ann")
    with pytest.raises(RlhfkitError, match="printable"):
        store.add_labeler("bad\nname")
    store.revoke("ann")
    assert store.labeler_for_token(token) is None
    with pytest.raises(RlhfkitError, match="already revoked"):
        store.revoke("ann")
    fresh = store.reissue_token("ann")
    assert store.labeler_for_token(fresh).name == "ann"  # type: ignore[union-attr]
    assert store.labeler_for_token(token) is None
    store.set_admin_token("a" * 20)
    assert store.is_admin_token("a" * 20) and not store.is_admin_token("b" * 20)
    with pytest.raises(RlhfkitError, match="at least"):
        store.set_admin_token("short")


def test_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite at all, just text " * 20)
    with pytest.raises(RlhfkitError, match="not a labeling database"):
        LabelStore(bad)
    with pytest.raises(RlhfkitError, match="no such labeling database"):
        LabelStore(tmp_path / "missing.db", create=False)


# ----------------------------------------------------------------------------------------------
# Statistics against hand-computed values


def test_cohen_kappa_matches_textbook_example() -> None:
    # Wikipedia's example: 50 items, both yes 20, A yes/B no 5, A no/B yes 10, both no 15:
    # p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None


def test_fleiss_kappa_matches_textbook_example() -> None:
    # Fleiss' kappa worked example (Wikipedia): 10 subjects, 14 raters, 5 categories, kappa 0.210 there
    # with P-e rounded to 0.213; exactly, P-bar = 0.378022 and P-e = 0.212755 give 0.209931.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [Counter({str(j): n for j, n in enumerate(row) if n}) for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.209931, abs=1e-6)
    assert raw_agreement(items) == pytest.approx(0.378022, abs=1e-6)
    assert fleiss_kappa([Counter({"a": 2}), Counter({"a": 3})]) is None
    assert fleiss_kappa([Counter({"a": 1})]) is None  # one rating: no agreement to measure


def test_position_bias_interval_and_p_value() -> None:
    bias = position_bias(["a"] * 8 + ["b"] * 2 + ["tie", "skip"])
    assert (bias["decided"], bias["left_wins"], bias["left_win_rate"]) == (10, 8, 0.8)
    assert bias["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # exact two-sided binomial
    assert (bias["ci_low"], bias["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=1e-3)  # Wilson, 95%
    assert binomial_two_sided_p(5, 10) == 1.0
    assert binomial_two_sided_p(5000, 10000) == 1.0 and binomial_two_sided_p(5300, 10000) < 1e-8
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert position_bias([])["left_win_rate"] is None


def test_majority() -> None:
    assert majority(["first", "first", "second"]) == ("first", pytest.approx(2 / 3))
    assert majority(["first", "second"]) == (None, 0.5)
    assert majority(["tie", "tie", "first"])[0] == "tie"
    assert majority([]) == (None, 0.0)


# Three labelers on four pairs (outcomes in each pair's own order); hand-computed:
# per-pair agreement 1, 1/3, 1/3, 1 -> raw 2/3; categories first 5, second 5, tie 2 of 12 ->
# P_e = 54/144 = 0.375 -> Fleiss (2/3 - 0.375) / 0.625 = 7/15.
# Cohen: ann/bob p_o 3/4, p_e 5/16 -> 7/11; ann/cy 3/4, 6/16 -> 0.6; bob/cy 1/2, 6/16 -> 0.2.
SCENARIO = {
    "ann": ["first", "first", "tie", "second"],
    "bob": ["first", "second", "tie", "second"],
    "cy": ["first", "first", "second", "second"],
}


@pytest.fixture(scope="module")
def scenario_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SCENARIO labels, given through next_pair/add_label once per module (fsync per label is slow)."""
    store = LabelStore(tmp_path_factory.mktemp("scenario") / "scenario.db")
    store.import_candidates(two_way(5))
    store.set_overlap(3)
    for name, outcomes in SCENARIO.items():
        who = labeler(store, name)
        for k, outcome in enumerate(outcomes):
            pair_id, choice = choice_for(store, who, outcome)
            assert pair_id == k + 1
            store.add_label(who, pair_id, choice, "close call" if (name, k) == ("bob", 1) else None)
    who = labeler(store, "dee")  # a fourth labeler gets the fifth pair and skips it: no part in agreement
    pair_id, _ = choice_for(store, who, "first")
    assert pair_id == 5
    store.add_label(who, pair_id, "skip")
    assert not Path(f"{store.path}-wal").exists()  # every connection closed: the file holds everything
    return store.path


@pytest.fixture
def scenario(scenario_db: Path, tmp_path: Path) -> LabelStore:
    """A private copy of the scenario database."""
    return LabelStore(shutil.copy(scenario_db, tmp_path / "scenario.db"))


def test_stats_agreement_and_kappas_hand_computed(scenario: LabelStore) -> None:
    stats = scenario.stats()
    assert (stats["pairs"], stats["overlap"], stats["labels"]) == (5, 3, 13)
    assert (stats["pairs_labelled"], stats["pairs_complete"], stats["progress"]) == (4, 4, 0.8)
    assert stats["by_choice"]["tie"] == 2 and stats["by_choice"]["skip"] == 1
    agreement = stats["agreement"]
    assert agreement["shared_pairs"] == 4
    assert agreement["raw"] == pytest.approx(2 / 3)
    assert agreement["fleiss_kappa"] == pytest.approx(7 / 15)
    cohen = {tuple(c["labelers"]): c for c in agreement["cohen"]}
    assert cohen["ann", "bob"]["kappa"] == pytest.approx(7 / 11)
    assert cohen["ann", "cy"]["kappa"] == pytest.approx(0.6)
    assert cohen["bob", "cy"]["kappa"] == pytest.approx(0.2)
    assert cohen["bob", "cy"]["agreement"] == pytest.approx(0.5) and cohen["bob", "cy"]["shared"] == 4
    assert agreement["mean_cohen_kappa"] == pytest.approx((7 / 11 + 0.6 + 0.2) / 3)
    per = {lb["name"]: lb for lb in stats["labelers"]}
    assert per["dee"]["skip"] == 1 and per["ann"]["labels"] == 4
    bias = stats["position_bias"]
    assert bias["decided"] == 10 and bias["left_wins"] == stats["by_choice"]["a"]


# ----------------------------------------------------------------------------------------------
# Export


def test_export_maps_shown_sides_back_to_chosen_and_rejected(scenario: LabelStore, tmp_path: Path) -> None:
    store = scenario
    rows, dropped = export_rows(store, "trl")
    assert dropped == {"tie": 2, "skip": 1}
    assert len(rows) == 10
    flat = [(n, k, o) for n, outcomes in SCENARIO.items() for k, o in enumerate(outcomes) if o != "tie"]
    assert len(flat) == len(rows)
    for row, (name, k, outcome) in zip(rows, flat, strict=True):
        winner, loser = (f"first {k}", f"second {k}") if outcome == "first" else (f"second {k}", f"first {k}")
        assert (row["prompt"], row["chosen"], row["rejected"]) == (f"prompt {k}", winner, loser)
        assert row["labeler"] == name and row["pair_id"] == k + 1 and row["model"] == "m"
        assert row["created_at"].endswith("Z")
        assert ("note" in row) == ((name, k) == ("bob", 1))
    vertex, _ = export_rows(store, "vertex")
    assert [(r["input_text"], r["candidate_0"], r["candidate_1"], r["choice"]) for r in vertex] == [
        (r["prompt"], r["chosen"], r["rejected"], 0) for r in rows
    ]
    assert all(r["labeler"] and r["created_at"] for r in vertex)
    ties, _ = export_rows(store, "trl", include_ties=True, include_skips=True)
    assert sum(r.get("tie", False) for r in ties) == 2 and sum(r.get("skip", False) for r in ties) == 1
    with pytest.raises(RlhfkitError, match="trl"):
        export_rows(store, "vertex", include_ties=True)


def test_export_majority_min_agreement_and_min_labels(scenario: LabelStore, tmp_path: Path) -> None:
    store = scenario
    rows, dropped = export_rows(store, "trl", aggregate="majority")
    # pair 3's majority is a tie (left out); the other three have a majority winner.
    assert [(r["pair_id"], r["chosen"], r["votes"]) for r in rows] == [
        (1, "first 0", 3),
        (2, "first 1", 3),
        (4, "second 3", 3),
    ]
    assert rows[1]["agreement"] == pytest.approx(2 / 3, abs=1e-6) and rows[1]["labelers"] == ["ann", "bob", "cy"]
    assert rows[1]["notes"] == ["bob: close call"]
    assert dropped == {"tie": 1, "only_skips": 1}
    strict, dropped = export_rows(store, "trl", aggregate="majority", min_agreement=0.9)
    assert [r["pair_id"] for r in strict] == [1, 4] and dropped == {"low_agreement": 2, "only_skips": 1}
    per_label, _ = export_rows(store, "trl", min_agreement=0.9)  # per-label rows of unanimous pairs only
    assert sorted({r["pair_id"] for r in per_label}) == [1, 4] and len(per_label) == 6
    assert export_rows(store, "trl", min_labels=4) == ([], {"too_few_labels": 12, "skip": 1})
    skip_only, dropped = export_rows(store, "trl", aggregate="majority", min_labels=4)
    assert skip_only == [] and dropped == {"too_few_labels": 4, "only_skips": 1}


def test_exported_files_load_as_preferences(scenario: LabelStore, tmp_path: Path) -> None:
    store = scenario
    for fmt in ("trl", "vertex"):
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in export_rows(store, fmt)[0]))
        records = load_preferences(path)
        assert len(records) == 10
        assert all(r.extra["labeler"] in SCENARIO for r in records)


# ----------------------------------------------------------------------------------------------
# The commands (through register, as cli.py wires them)


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli(), [str(a) for a in args], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_commands_add_list_revoke_export_stats(scenario: LabelStore, tmp_path: Path) -> None:
    db = scenario.path
    code, out = invoke("add-labeler", "--db", db, "--name", "eve", "--url", "http://host:9000/")
    assert code == 0, out
    token = out.split("token: ")[1].split()[0]
    assert f"http://host:9000/#token={token}" in out
    assert LabelStore(db).labeler_for_token(token).name == "eve"  # type: ignore[union-attr]
    code, out = invoke("add-labeler", "--db", db, "--name", "eve")
    assert code == 2 and "already exists" in out
    code, out = invoke("list-labelers", "--db", db)
    assert code == 0 and "eve" in out and "ann" in out
    code, out = invoke("revoke", "--db", db, "--name", "eve")
    assert code == 0 and LabelStore(db).labeler_for_token(token) is None
    code, out = invoke("add-labeler", "--db", db, "--name", "eve", "--new-token")
    assert code == 0 and LabelStore(db).labeler_for_token(out.split("token: ")[1].split()[0]) is not None
    code, out = invoke("export", "--db", db, "--out", tmp_path / "prefs.jsonl", "--format", "vertex")
    assert code == 0, out
    assert len(load_preferences(tmp_path / "prefs.jsonl")) == 10
    code, out = invoke("export", "--db", db, "--out", tmp_path / "x.jsonl", "--format", "vertex", "--include-ties")
    assert code == 2 and "trl" in out
    code, out = invoke("export", "--db", db, "--out", tmp_path / "x.jsonl", "--min-labels", "9")
    assert code == 2 and "nothing to export" in out
    code, out = invoke("stats", "--db", db, "--out", tmp_path / "stats.json")
    assert code == 0, out
    assert "Fleiss" in out and "0.4667" in out and "position bias" in out
    assert json.loads((tmp_path / "stats.json").read_text())["agreement"]["fleiss_kappa"] == pytest.approx(7 / 15)
    code, out = invoke("stats", "--db", tmp_path / "missing.db")
    assert code == 2 and "no such labeling database" in out


def test_serve_rejects_an_empty_project(tmp_path: Path) -> None:
    code, out = invoke("serve", "--db", tmp_path / "empty.db", "--port", "8123")
    assert code == 2 and "no pairs" in out and "--candidates" in out
    code, out = invoke("serve", "--db", tmp_path / "empty.db", "--overlap", "0")
    assert code == 2 and "overlap" in out


def test_form_pairs_adjacent_keeps_disjoint_pairs_of_usable_texts() -> None:
    assert form_pairs(["a", "b", "c", "d"], adjacent=True) == [(0, 1), (2, 3)]
    assert form_pairs(["a", "a", "c", "", "e"], adjacent=True) == []  # copies and empties take no part

"""The labeling HTTP API: auth, the label/undo flow, bad bodies, 8 concurrent labelers, SIGKILL.

The concurrency test runs a real uvicorn in a thread; the kill-and-restart test runs
``label serve`` as a subprocess and kills it with SIGKILL mid-session.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from uvicorn_thread import ServerThread, free_port

from rlhfkit.data import CandidateRecord
from rlhfkit.labeling.server import create_app
from rlhfkit.labeling.store import LabelStore, export_rows

ADMIN = "admin-token-for-tests-0123456789"


def candidates(n_prompts: int, k: int = 3) -> list[CandidateRecord]:
    return [CandidateRecord(f"prompt {p}", [f"answer {p}.{i}" for i in range(k)], "m") for p in range(n_prompts)]


def make_store(path: Path, n_prompts: int = 3, k: int = 3, overlap: int = 1) -> LabelStore:
    store = LabelStore(path)
    store.import_candidates(candidates(n_prompts, k))
    store.set_overlap(overlap)
    store.set_admin_token(ADMIN)
    return store


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def project(tmp_path: Path) -> tuple[LabelStore, TestClient, dict[str, str]]:
    store = make_store(tmp_path / "labels.db", n_prompts=2, k=3)  # 6 pairs
    tokens = {name: store.add_labeler(name) for name in ("ann", "bob")}
    return store, TestClient(create_app(store.path)), tokens


# ----------------------------------------------------------------------------------------------
# Auth


def test_every_api_call_needs_a_valid_bearer_token(project: tuple[LabelStore, TestClient, dict[str, str]]) -> None:
    store, client, tokens = project
    calls = [("GET", "/api/next"), ("POST", "/api/label"), ("POST", "/api/undo"), ("GET", "/api/progress")]
    admin_calls = [("GET", "/api/admin/stats"), ("GET", "/api/admin/labelers")]
    for method, path in calls + admin_calls:
        for headers in ({}, auth("wrong-token"), {"Authorization": tokens["ann"]}, {"Authorization": "Basic abc"}):
            response = client.request(method, path, headers=headers, json={"pair_id": 1, "choice": "a"})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    for method, path in admin_calls:  # a labeler on an admin route
        assert client.request(method, path, headers=auth(tokens["ann"])).status_code == 403
    for method, path in calls:  # the admin is not a labeler
        assert client.request(method, path, headers=auth(ADMIN), json={}).status_code == 403
    assert client.get("/api/admin/stats", headers=auth(ADMIN)).status_code == 200
    store.revoke("bob")
    assert client.get("/api/next", headers=auth(tokens["bob"])).status_code == 401
    assert client.get("/api/next", headers=auth("x" * 10_000)).status_code == 401
    assert client.get("/healthz").json() == {"ok": True}


# ----------------------------------------------------------------------------------------------
# Next, label, undo


def test_label_flow_until_done_then_204(project: tuple[LabelStore, TestClient, dict[str, str]]) -> None:
    store, client, tokens = project
    ann = auth(tokens["ann"])
    assert client.get("/api/progress", headers=ann).json() == {
        "labeler": "ann",
        "mode": "pair",
        "done": 0,
        "remaining": 6,
    }
    given = []
    while True:
        response = client.get("/api/next", headers=ann)
        if response.status_code == 204:
            assert response.content == b""
            break
        assert response.status_code == 200
        pair = response.json()
        assert set(pair) == {"kind", "pair_id", "prompt", "a", "b", "progress"}
        assert pair["prompt"].startswith("prompt ") and pair["a"] != pair["b"]
        assert client.get("/api/next", headers=ann).json()["pair_id"] == pair["pair_id"]  # reload: same pair
        choice = "ab"[len(given) % 2]
        response = client.post("/api/label", headers=ann, json={"pair_id": pair["pair_id"], "choice": choice})
        assert response.status_code == 200 and response.json()["duplicate"] is False
        given.append((pair, choice))
    assert len(given) == 6
    assert client.get("/api/progress", headers=ann).json() == {
        "labeler": "ann",
        "mode": "pair",
        "done": 6,
        "remaining": 0,
    }
    assert client.get("/api/next", headers=auth(tokens["bob"])).status_code == 204  # overlap 1: nothing for bob
    rows, _ = export_rows(store, "trl")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        (p["a"], p["b"]) if c == "a" else (p["b"], p["a"]) for p, c in given
    ]
    # Undo after finishing: the last pair comes back, and its label leaves the export.
    response = client.post("/api/undo", headers=ann)
    assert response.status_code == 200 and response.json()["undone"]["pair_id"] == given[-1][0]["pair_id"]
    assert client.get("/api/next", headers=ann).json()["pair_id"] == given[-1][0]["pair_id"]
    assert len(export_rows(store, "trl")[0]) == 5


def test_label_conflicts_are_409_and_retries_are_idempotent(
    project: tuple[LabelStore, TestClient, dict[str, str]],
) -> None:
    store, client, tokens = project
    ann, bob = auth(tokens["ann"]), auth(tokens["bob"])
    pair_id = client.get("/api/next", headers=ann).json()["pair_id"]
    assert client.post("/api/label", headers=bob, json={"pair_id": pair_id, "choice": "a"}).status_code == 409
    assert client.post("/api/label", headers=ann, json={"pair_id": 999, "choice": "a"}).status_code == 409
    body = {"pair_id": pair_id, "choice": "tie", "note": "both fine"}
    first = client.post("/api/label", headers=ann, json=body).json()
    retry = client.post("/api/label", headers=ann, json=body).json()
    assert retry["label_id"] == first["label_id"] and retry["duplicate"] is True
    response = client.post("/api/label", headers=ann, json={"pair_id": pair_id, "choice": "b"})
    assert response.status_code == 409 and "undo" in response.json()["detail"]
    assert len(store.label_rows()) == 1 and store.label_rows()[0].note == "both fine"
    assert client.post("/api/undo", headers=bob).status_code == 409  # bob has nothing to undo


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"pair_id": 1, "choice": "left"}, "choice: Input should be 'a', 'b', 'tie' or 'skip'"),
        ({"choice": "a"}, "pair_id: Field required"),
        ({"pair_id": "1", "choice": "a"}, "pair_id: Input should be a valid integer"),
        ({"pair_id": True, "choice": "a"}, "pair_id: Input should be a valid integer"),
        ({"pair_id": 10**30, "choice": "a"}, "pair_id: Input should be less than or equal to"),
        ({"pair_id": 0, "choice": "a"}, "pair_id: Input should be greater than or equal to 1"),
        ({"pair_id": 1, "choice": "a", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"pair_id": 1, "choice": "a", "note": "x" * 2001}, "note: String should have at most 2000 characters"),
        ({"pair_id": 1, "choice": "a", "note": 5}, "note: Input should be a valid string"),
        ([1, 2], "body: expected a JSON object"),
        (b'{"pair_id": 1,', "body: invalid JSON"),
        (b"", "body: expected a JSON object"),
    ],
)
def test_malformed_bodies_get_422_with_a_readable_message(
    project: tuple[LabelStore, TestClient, dict[str, str]], body: Any, message: str
) -> None:
    store, client, tokens = project
    client.get("/api/next", headers=auth(tokens["ann"]))
    headers = {**auth(tokens["ann"]), "content-type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/api/label", headers=headers, content=content)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert store.label_rows() == []


def test_request_bodies_are_bounded(project: tuple[LabelStore, TestClient, dict[str, str]]) -> None:
    store, client, tokens = project
    headers = {**auth(tokens["ann"]), "content-type": "application/json"}
    big = json.dumps({"pair_id": 1, "choice": "a", "note": "x" * 70_000}).encode()
    response = client.post("/api/label", headers=headers, content=big)
    assert response.status_code == 413 and "65536" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        yield b'{"pair_id": 1, "choice": "a", "note": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    response = client.post("/api/label", headers=headers, content=chunks())
    assert response.status_code == 413
    assert store.label_rows() == []


def test_pages_are_static_text_only_with_a_strict_csp(project: tuple[LabelStore, TestClient, dict[str, str]]) -> None:
    _, client, _ = project
    for path, marker in (("/", "A much better"), ("/admin", "live statistics")):
        response = client.get(path)
        assert response.status_code == 200 and marker in response.text
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "innerHTML" not in response.text and "insertAdjacentHTML" not in response.text


def test_admin_stats_match_the_store(project: tuple[LabelStore, TestClient, dict[str, str]]) -> None:
    store, client, tokens = project
    store.set_overlap(2)
    for name in ("ann", "bob"):
        for _ in range(2):
            pair = client.get("/api/next", headers=auth(tokens[name])).json()
            client.post("/api/label", headers=auth(tokens[name]), json={"pair_id": pair["pair_id"], "choice": "a"})
    stats = client.get("/api/admin/stats", headers=auth(ADMIN)).json()
    assert stats == json.loads(json.dumps(store.stats()))
    assert stats["labels"] == 4 and stats["agreement"]["shared_pairs"] == 2
    labelers = client.get("/api/admin/labelers", headers=auth(ADMIN)).json()
    assert [(lb["name"], lb["labels"]) for lb in labelers] == [("ann", 2), ("bob", 2)]


# ----------------------------------------------------------------------------------------------
# Concurrency: 8 labelers at once against a real server


def test_eight_concurrent_labelers_lose_and_double_nothing(tmp_path: Path) -> None:
    overlap = 2
    store = make_store(tmp_path / "labels.db", n_prompts=12, k=3, overlap=overlap)  # 36 pairs
    names = [f"labeler{i}" for i in range(8)]
    tokens = {name: store.add_labeler(name) for name in names}
    accepted: dict[str, list[tuple[int, int, str]]] = {name: [] for name in names}
    seen: dict[str, list[int]] = {name: [] for name in names}
    errors: list[str] = []

    def work(name: str, start: threading.Barrier, rng: random.Random) -> None:
        try:
            with httpx.Client(base_url=server.url, headers=auth(tokens[name]), timeout=60) as client:
                start.wait()
                while True:
                    response = client.get("/api/next")
                    if response.status_code == 204:
                        return
                    response.raise_for_status()
                    pair_id = response.json()["pair_id"]
                    seen[name].append(pair_id)
                    choice = rng.choice(["a", "b", "a", "b", "tie", "skip"])
                    for attempt in range(2 if rng.random() < 0.25 else 1):  # some clients retry
                        response = client.post("/api/label", json={"pair_id": pair_id, "choice": choice})
                        response.raise_for_status()
                        body = response.json()
                        assert body["duplicate"] is (attempt == 1)
                        if attempt == 0:
                            accepted[name].append((body["label_id"], pair_id, choice))
        except Exception as exc:  # surfaced below: an assert in a thread would be lost
            errors.append(f"{name}: {exc!r}")

    # A labeler stops at its first 204, but a skip by someone still working can free a slot after
    # that; so run rounds until one adds nothing (between rounds no lease is held, so a round where
    # everybody gets 204 at once proves the queue empty). The first round is the concurrent test.
    rngs = {name: random.Random(name) for name in names}
    with ServerThread(create_app(store.path)) as server:
        for _ in range(10):
            before = sum(len(a) for a in accepted.values())
            start = threading.Barrier(len(names))
            threads = [threading.Thread(target=work, args=(name, start, rngs[name])) for name in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            if sum(len(a) for a in accepted.values()) == before:
                break
        else:
            raise AssertionError("labelers still labeling after 10 rounds")

    given = [  # the page's pair ids are random public ones; the labels table holds the stored ids
        (label_id, store.pair_id_for(public_id), name, choice)
        for name in names
        for label_id, public_id, choice in accepted[name]
    ]
    with sqlite3.connect(store.path) as con:
        stored = con.execute(
            "SELECT l.id, l.pair_id, lb.name, l.choice FROM labels l JOIN labelers lb ON lb.id = l.labeler_id"
        ).fetchall()
    assert sorted(stored) == sorted(given)  # every accepted label exactly once, nothing else
    for name in names:
        assert len(seen[name]) == len(set(seen[name])), f"{name} got a pair twice"
    decided = Counter(pair_id for _, pair_id, _, choice in given if choice != "skip")
    assert decided == {pair_id: overlap for pair_id in range(1, 37)}  # skips freed slots for others
    assert len({name for name in names if accepted[name]}) >= 4  # the work really was shared


# ----------------------------------------------------------------------------------------------
# SIGKILL and restart: nothing accepted is lost


SERVE = "import typer; from rlhfkit.labeling.commands import register; app = typer.Typer(); register(app); app()"


def start_serve(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_sigkill_and_restart_lose_nothing_accepted(tmp_path: Path) -> None:
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"p{i}", "completions": ["x", "y", "z"]}) + "\n" for i in range(4)))
    db = tmp_path / "labels.db"
    args = ["--candidates", str(cands), "--db", str(db)]
    proc, url = start_serve(args, tmp_path / "first.log")
    try:
        first_log = (tmp_path / "first.log").read_text()
        assert "pairs added" in first_log and "admin token" in first_log
        admin = first_log.split("admin token (shown once, stored hashed): ")[1].split()[0]
        token = LabelStore(db).add_labeler("ann")  # added while the server runs
        accepted = []
        with httpx.Client(base_url=url, headers=auth(token), timeout=30) as client:
            for i in range(5):
                pair = client.get("/api/next").json()
                choice = "ab"[i % 2]
                response = client.post(
                    "/api/label", json={"pair_id": pair["pair_id"], "choice": choice, "note": f"n{i}"}
                )
                assert response.status_code == 200
                accepted.append((response.json()["label_id"], pair["pair_id"], choice, f"n{i}"))
            shown = client.get("/api/next").json()["pair_id"]  # on screen, unlabelled, when the server dies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    proc, url = start_serve(args, tmp_path / "second.log")
    try:
        second_log = (tmp_path / "second.log").read_text()
        assert "admin token (shown once" not in second_log  # the first one stays valid
        assert re.search(r"pairs added\s*│\s*0\s*│", second_log), second_log  # same file again: nothing new
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT id, pair_id, choice, note FROM labels WHERE undone_at IS NULL").fetchall()
            assert con.execute("SELECT count(*) FROM pairs").fetchone()[0] == 12  # re-import added nothing
        public = LabelStore(db).pair_id_for  # the page's pair ids are random public ones
        assert sorted(rows) == sorted((label_id, public(pid), choice, note) for label_id, pid, choice, note in accepted)
        with httpx.Client(base_url=url, headers=auth(token), timeout=30) as client:
            assert client.get("/api/next").json()["pair_id"] == shown  # the same pair is still on offer
            assert client.get("/api/progress").json()["done"] == 5
            assert client.post("/api/undo").json()["undone"]["label_id"] == accepted[-1][0]
            stats = client.get("/api/admin/stats", headers=auth(admin)).json()
        assert stats["labels"] == 4 and stats["pairs"] == 12
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

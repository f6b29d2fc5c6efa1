"""Both HTTP servers take abuse: fuzzed from their OpenAPI schemas, then attacked by hand.

The fuzz tests (schemathesis, against a real uvicorn): each draws requests from the schema, valid
ones and deliberately invalid ones (schemathesis' positive and negative modes), sends them over a
socket and holds every answer to the schema: no 5xx, a documented status, a documented content type
and body, invalid input rejected with a 4xx, and an answer within ``TIMEOUT_S`` (no hang). A share
of the drawn requests is steered onto what exists (the served model's name, the labeler's assigned
pair) so that the fuzzing reaches the generation and labeling code, not only the 404 and 409 paths.

``rlhf label serve`` does not publish its schema (it has no need to advertise its API); its
``app.openapi()`` is built in-process and the requests still go to the real server.

By hand: bodies over the limit (declared and chunked), JSON nested past the parser's depth,
invalid UTF-8, NaN and Infinity, huge ``n`` / ``max_tokens`` / prompt lists, a full queue (503
with Retry-After), 64 concurrent clients of which some leave mid-stream or mid-request, and the
rows of a batch leaving it as they end.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from uvicorn_thread import ServerThread

from rlhfkit.labeling.server import create_app as create_labeling_app
from rlhfkit.labeling.store import LabelStore
from rlhfkit.serving.server import Job, ServeEngine
from rlhfkit.serving.server import create_app as create_serving_app

BASE = "tiny-random"
ADMIN = "admin-token-for-fuzzing-0123456789"
TIMEOUT_S = 30  # a request that takes longer than this is a hang
MIN_REQUESTS = 1000  # per server
# Examples per (operation, mode); hypothesis stops early where fewer distinct requests exist. The
# OpenAI server has three operations with inputs, the labeling server nine (the bearer token).
SERVE_EXAMPLES, LABEL_EXAMPLES = 250, 100
# Options the server answers with "not supported" (a 400): left out of the steered requests.
REFUSED = {
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "echo",
    "best_of",
    "suffix",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def fuzz(schema: schemathesis.BaseSchema, base_url: str, steer, sent: Counter, examples: int) -> None:
    """Send ``examples`` requests per operation and mode; ``steer(case, data, adjust)`` gives the headers
    and, where ``adjust``, may point a valid request at what exists.

    An operation without inputs (``GET /health``) has no invalid requests: its negative mode is
    skipped when hypothesis finds none.
    """

    def requests_for(operation, mode: GenerationMode, label: str):
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests on every run: a failure reproduces
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def one_request(case: schemathesis.Case, data: st.DataObject) -> None:
            # Invalid requests stay as drawn: steering one could make it valid.
            headers = steer(case, data, adjust=mode is GenerationMode.POSITIVE)
            response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=TIMEOUT_S)
            if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                check_event_stream(response.text)
            sent[f"{label} {response.status_code}"] += 1

        return one_request

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            label = f"{operation.method.upper()} {operation.path} {mode.value}"
            try:
                requests_for(operation, mode, label)()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, f"{label}: no valid request could be drawn"


def check_event_stream(text: str) -> None:
    """Server-sent events as the OpenAI API sends them: JSON chunks (or an error), then [DONE].

    schemathesis stops reading a stream after a few events (a client leaving mid-stream), so the
    events that did arrive are checked and [DONE], where it came, must be the last.
    """
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events, text[:200]
    for i, event in enumerate(events):
        if event == "[DONE]":
            assert i == len(events) - 1, text[-300:]
            continue
        chunk = json.loads(event)
        assert "choices" in chunk or set(chunk) == {"error"}, chunk


def summary(sent: Counter) -> str:
    for key, count in sorted(sent.items()):
        print(f"  {key}: {count}")
    by_status = Counter()
    for key, count in sent.items():
        by_status[key.rsplit(" ", 1)[1]] += count
    return f"{sum(sent.values())} requests, by status {dict(sorted(by_status.items()))}"


def test_openai_server_survives_schema_fuzzing() -> None:
    engine = ServeEngine(BASE, max_batch_size=16, max_model_len=96, default_max_tokens=8)
    with ServerThread(create_serving_app(engine)) as server:
        engine.start()  # the test server runs without lifespan events
        try:
            schema = schemathesis.openapi.from_url(server.url + "/openapi.json")

            def steer(case: schemathesis.Case, data: st.DataObject, adjust: bool) -> dict[str, str]:
                # Half the drawn bodies name the served model and leave out the options this server
                # refuses, so that generation runs, not only the 404 and the 400s.
                if adjust and isinstance(case.body, dict) and data.draw(st.booleans()):
                    case.body = {key: value for key, value in case.body.items() if key not in REFUSED}
                    case.body["model"] = BASE
                    for message in case.body.get("messages") or []:
                        if not isinstance(message.get("content"), str):  # image parts: refused by design
                            message["content"] = "Say hello."
                if adjust and case.path_parameters and data.draw(st.booleans()):
                    case.path_parameters["name"] = BASE
                return {}

            sent: Counter = Counter()
            fuzz(schema, server.url, steer, sent, SERVE_EXAMPLES)
        finally:
            engine.stop(10)
    print(summary(sent))
    assert sum(sent.values()) >= MIN_REQUESTS
    generated = sum(n for key, n in sent.items() if "completions" in key and key.endswith(" 200"))
    assert generated >= 50, f"too few requests reached generation: {sent}"
    assert engine.sequences >= generated


def test_labeling_server_survives_schema_fuzzing(tmp_path: Path) -> None:
    from rlhfkit.data import CandidateRecord

    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates(
        [CandidateRecord(f"prompt {p}", [f"answer {p}.{i}" for i in range(3)], "m") for p in range(40)]
    )
    store.set_admin_token(ADMIN)
    tokens = [store.add_labeler(name) for name in ("ann", "bob")]
    app = create_labeling_app(store.path)
    schema = schemathesis.openapi.from_dict(app.openapi())
    with ServerThread(app) as server:
        # Valid labeler tokens, the admin token, or (None) the header schemathesis drew: a random
        # token, a malformed header or none at all.
        choices = [*tokens, ADMIN, None]

        def steer(case: schemathesis.Case, data: st.DataObject, adjust: bool) -> dict[str, str]:
            token = data.draw(st.sampled_from(choices))
            labels = adjust and token in tokens and isinstance(case.body, dict) and "pair_id" in case.body
            if labels and data.draw(st.booleans()):
                shown = httpx.get(server.url + "/api/next", headers={"Authorization": f"Bearer {token}"}, timeout=10)
                if shown.status_code == 200:
                    case.body["pair_id"] = shown.json()["pair_id"]  # a label that can be stored
                    if case.body.get("choice") not in ("a", "b"):
                        case.body.pop("strength", None)  # a strength goes with a or b only
            return {} if token is None else {"Authorization": f"Bearer {token}"}

        sent: Counter = Counter()
        fuzz(schema, server.url, steer, sent, LABEL_EXAMPLES)
    print(summary(sent))
    assert sum(sent.values()) >= MIN_REQUESTS
    stored = sum(n for key, n in sent.items() if key.startswith("POST /api/label") and key.endswith(" 200"))
    assert stored >= 10, f"too few labels were stored: {sent}"
    assert all(not key.endswith(" 500") for key in sent)


# ----------------------------------------------------------------------------------------------
# By hand


def openai_error(response: httpx.Response, status: int) -> str:
    """The message of an OpenAI-shaped error with this status (the test fails on anything else)."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in response.text
    return body["error"]["message"]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServeEngine, str]]:
    engine = ServeEngine(BASE, max_batch_size=4, max_model_len=128, default_max_tokens=8, max_queue=8)
    app = create_serving_app(engine, max_body_bytes=64 * 1024)
    with ServerThread(app) as server:
        engine.start()
        yield engine, server.url
        engine.stop(10)


def test_bad_bodies_get_readable_4xx(served: tuple[ServeEngine, str]) -> None:
    _, url = served
    chat = url + "/v1/chat/completions"
    json_type = {"Content-Type": "application/json"}
    message = [{"role": "user", "content": "hi"}]

    big = b'{"model": "tiny-random", "prompt": "' + b"a" * 70_000 + b'"}'
    assert "over 65536 bytes" in openai_error(httpx.post(url + "/v1/completions", content=big, headers=json_type), 413)

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny-random", "prompt": "'
        for _ in range(20):
            yield b"a" * 8192
        yield b'"}'

    chunked = httpx.post(url + "/v1/completions", content=chunks(), headers=json_type)
    assert "over 65536 bytes" in openai_error(chunked, 413)

    nested = b'{"model": "tiny-random", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert "nested too deeply" in openai_error(httpx.post(chat, content=nested, headers=json_type), 400)
    not_utf8 = b'{"model": "tiny-random", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert "not valid UTF-8" in openai_error(httpx.post(chat, content=not_utf8, headers=json_type), 400)

    for field, value in (("temperature", "NaN"), ("top_p", "Infinity"), ("temperature", "-Infinity")):
        raw = f'{{"model": "tiny-random", "messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
        assert f"{field}: Input should be a finite number" in openai_error(
            httpx.post(chat, content=raw.encode(), headers=json_type), 400
        )
    for extra, expected in (
        ({"n": 10**30}, "n: Input should be less than or equal to 16"),
        ({"max_tokens": 10**30}, "maximum context length is 128 tokens"),
        ({"max_tokens": 2**63}, "maximum context length is 128 tokens"),
        ({"max_completion_tokens": 10**6, "n": 16}, "maximum context length"),
        ({"stop": ["x"] * 1000}, "at most 4 stop strings"),
    ):
        response = httpx.post(chat, json={"model": BASE, "messages": message, **extra})
        assert expected in openai_error(response, 400), extra
    many = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": ["hi"] * 2000})
    assert "2000 sequences" in openai_error(many, 400)
    n_times_prompts = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": ["hi"] * 4, "n": 5})
    assert "20 sequences" in openai_error(n_times_prompts, 400)
    # A seed far past 64 bits is folded, not an overflow; a 2.0 is the integer 2.
    fine = httpx.post(chat, json={"model": BASE, "messages": message, "seed": 10**40, "max_tokens": 2.0, "n": 2.0})
    assert fine.status_code == 200 and len(fine.json()["choices"]) == 2
    # A temperature just above 0 is near-greedy sampling, not inf / inf = NaN (found by the fuzzer).
    for temperature in (1e-30, 1e-300, 5e-324):
        tiny = httpx.post(chat, json={"model": BASE, "messages": message, "temperature": temperature, "max_tokens": 3})
        assert tiny.status_code == 200, (temperature, tiny.text)


def test_a_full_queue_answers_503_with_retry_after_and_64_clients_come_and_go(
    served: tuple[ServeEngine, str],
) -> None:
    engine, url = served
    forward = engine._forward

    def slow_forward(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(0.004)
        return forward(*args, **kwargs)

    engine._forward = slow_forward  # type: ignore[method-assign]
    deepest = 0
    stop_watch = threading.Event()

    def watch() -> None:
        nonlocal deepest
        while not stop_watch.is_set():
            deepest = max(deepest, engine.queued)
            time.sleep(0.001)

    def client(i: int) -> str:
        body = {"model": BASE, "prompt": f"client {i}", "max_tokens": 24, "temperature": 0}
        if i % 4 == 0:  # streams, then hangs up after the first event
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as response:
                if response.status_code == 200:
                    next(response.iter_lines())
                    return "left mid-stream"
                openai_error(response.read() and response, 503)
                assert int(response.headers["retry-after"]) >= 1
                return "503"
        if i % 4 == 1:  # gives up while waiting for a plain answer
            try:
                httpx.post(url + "/v1/completions", json=body, timeout=0.05)
            except httpx.TimeoutException:
                return "left mid-request"
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        if response.status_code == 503:
            assert "busy" in openai_error(response, 503) and int(response.headers["retry-after"]) >= 1
            return "503"
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] is not None
        return "200"

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rejected_before = engine.rejected
    try:
        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(client, range(64)))
    finally:
        stop_watch.set()
        watcher.join()
        engine._forward = forward  # type: ignore[method-assign]
    counts = Counter(outcomes)
    print(dict(counts), "deepest queue", deepest)
    assert counts["200"] >= 1 and counts["503"] >= 1 and engine.rejected > rejected_before
    assert deepest <= engine.max_queue  # bounded, whatever the load
    deadline = time.monotonic() + 30  # everything drains: no job is stuck behind a client that left
    while engine.queued and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.queued == 0
    after = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "still there?", "max_tokens": 2})
    assert after.status_code == 200


def test_a_client_that_leaves_a_plain_request_frees_the_worker(served: tuple[ServeEngine, str]) -> None:
    engine, url = served
    forward = engine._forward

    def slow_forward(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(0.02)  # 100 tokens: 2 s if the abandoned request kept decoding
        return forward(*args, **kwargs)

    engine._forward = slow_forward  # type: ignore[method-assign]
    engine.eos_ids, eos = set(), engine.eos_ids  # so the abandoned request would run its full length
    try:
        rows_before = engine.decoded_rows
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 100}, timeout=0.3)
        deadline = time.monotonic() + 10
        while engine.decoded_rows - rows_before < 100 and time.monotonic() < deadline:
            before = engine.decoded_rows
            time.sleep(0.5)
            if engine.decoded_rows == before:
                break  # decoding stopped
        assert engine.decoded_rows - rows_before < 60, "the abandoned request kept decoding"
    finally:
        engine._forward = forward  # type: ignore[method-assign]
        engine.eos_ids = eos


def test_rows_leave_the_batch_as_they_end_and_the_rest_decode_unchanged() -> None:
    """A batch of a 2-token and a 10-token request decodes 2 + 8 row-steps, not 2 x 9, and the long
    request's tokens equal those it gets decoded alone (greedy)."""
    engine = ServeEngine(BASE, max_batch_size=8)
    engine.eos_ids = set()  # every row runs to its max_tokens
    prompt = engine.encode_text("Tell me about the sea")

    def job(max_tokens: int) -> tuple[Job, list]:
        events: list = []
        j = Job(BASE, None, [prompt], 1, max_tokens, 0.0, 1.0, [], None, False)
        j.emit = events.append  # type: ignore[method-assign]
        return j, events

    (short, _), (long, together) = job(2), job(10)
    engine._generate([short, long])
    assert engine.decoded_rows == 2 + 8  # step 1: both rows; steps 2-9: the long one alone
    alone_job, alone = job(10)
    engine._generate([alone_job])
    assert together[-1][2] == alone[-1][2] and together[-1][3] == "length"


def test_labeling_server_bad_bodies_and_64_clients_that_come_and_go(tmp_path: Path) -> None:
    from rlhfkit.data import CandidateRecord

    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates([CandidateRecord(f"prompt {p}", [f"a {p}.{i}" for i in range(3)], "m") for p in range(30)])
    tokens = [store.add_labeler(f"labeler{i}") for i in range(8)]
    with ServerThread(create_labeling_app(store.path)) as server:
        url, auth = server.url, {"Authorization": f"Bearer {tokens[0]}", "Content-Type": "application/json"}
        for body, expected in (
            (b'{"pair_id": 1, "choice": "\xff"}', "not valid UTF-8"),
            (b'{"pair_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
            (b'{"pair_id": NaN, "choice": "a"}', "pair_id"),
            (b'{"pair_id": Infinity, "choice": "a"}', "pair_id"),
            (b'{"pair_id": 1e400, "choice": "a"}', "pair_id"),
            (b'{"pair_id": 99999999999999999999999, "choice": "a"}', "pair_id"),
        ):
            response = httpx.post(url + "/api/label", content=body, headers=auth)
            assert response.status_code == 422 and expected in response.json()["detail"], response.text

        def labeler(i: int) -> str:
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            try:
                shown = httpx.get(url + "/api/next", headers=headers, timeout=0.02 if i % 5 == 0 else 30)
                if shown.status_code == 204:
                    return "done"
                pair = shown.json()["pair_id"]
                answer = httpx.post(
                    url + "/api/label", json={"pair_id": pair, "choice": "a"}, headers=headers, timeout=30
                )
            except httpx.TimeoutException:
                return "left"
            assert answer.status_code in (200, 409), answer.text
            return str(answer.status_code)

        with ThreadPoolExecutor(64) as pool:
            outcomes = Counter(pool.map(labeler, range(64)))
        assert outcomes["200"] >= 8 and set(outcomes) <= {"200", "409", "done", "left"}, outcomes
        stats = httpx.get(url + "/healthz")
        assert stats.status_code == 200
    labels = store.label_rows()
    assert len({(row.labeler, row.pair_id) for row in labels}) == len(labels)  # no label stored twice

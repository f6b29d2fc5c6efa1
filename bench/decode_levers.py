"""Greedy decoding on SmolLM2-135M (fp32, CPU) against its floors, one lever at a time (issue 17, first step).

    .venv/bin/python bench/decode_levers.py            # ~8 min on 2 cores
    .venv/bin/python bench/decode_levers.py --no-compile --batches 1

For batch 1 and batch 16 (prompts of exactly ``--prompt-len`` tokens, so no padding: the last tokens
of chat-formatted prompts that ask for long answers; ``--new-tokens`` greedy tokens, seed 0) it times
each lever alone and prints a markdown table with, beside every rate, both floors from
``_floors.decode_floors``: the memory floor (every weight and the KV cache so far read once per
forward, over the memory bandwidth measured in this run) and the compute floor (the matmul and
attention FLOPs over the fp32 matmul rate measured in this run). ``x mem`` and ``x FLOP`` are the
measured time over each floor's time (1.0 = at the floor).

Rows:

- ``(a) today``: ``rlhfkit.generation.sample_batch`` (HF ``generate``, DynamicCache; transformers
  already passes ``logits_to_keep=1``, so only the last position gets logits).
- ``(b) static cache``: the same ``generate`` with ``cache_implementation="static"`` (no compile: on
  the CPU transformers compiles only when told to).
- ``(c) compiled``: (b) with a ``CompileConfig`` (inductor, mode ``default``) and
  ``_compile_all_devices`` so transformers compiles the decode-step forward on the CPU; run in a
  child process under ``--compile-timeout``; the first call (compile included) is reported apart.
- ``(d) manual, full logits``: a plain greedy loop over ``model(...)`` with a DynamicCache and
  ``logits_to_keep=0`` (the prefill computes the LM head on every prompt position).
- ``(e) manual, last logits``: the same loop with ``logits_to_keep=1``: against (a) it sizes
  ``generate``'s own per-token Python work; against (d) the last-position-only lever.
- ``(f) matmuls alone``: not a decoder: every ``nn.Linear`` of one decode step on a (batch, in)
  input, ``--new-tokens`` times: how far the matmul kernels alone are from the floors.
- ``serve``: ``rlhf serve``'s own decode loop (``ServeEngine._generate``, called directly with one
  job per row, temperature 0), non-streaming and streaming (streaming decodes each row's whole text
  every token). Its rows leave the batch at EOS, so it may decode fewer tokens than the others.

Every row is timed best of ``--repeats`` after one warm-up call; ``same`` says whether its greedy
tokens (after the first EOS, padding) equal row (a)'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _floors import decode_floors, matmul_gflops, memory_gbps

MODEL = "smollm2-135m"
THREADS = 2
PROMPTS = [
    "Write a long, detailed essay about the history of bread, from ancient Egypt to today.",
    "Explain in detail how a steam engine works, step by step, with examples.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, at length, the water cycle and why it matters for farming.",
    "Write a detailed guide to planting a vegetable garden in spring.",
    "Explain the causes of the French Revolution in a long, thorough answer.",
    "Write a long letter to a friend describing a trip through the mountains.",
    "Explain in depth how computers store numbers in memory, with examples.",
    "Write a long, detailed description of a busy market in a coastal town.",
    "Describe the life cycle of a star in as much detail as you can.",
    "Write a detailed essay on why sleep is important for health.",
    "Explain step by step how to bake a loaf of sourdough bread.",
    "Write a long story about two children who build a raft and sail down a river.",
    "Describe in detail how bees make honey and organise their hive.",
    "Write a long essay about the invention of the printing press and its effects.",
    "Explain at length how a bicycle stays upright while moving.",
]


def setup(prompt_len: int):
    """The model, tokenizer and the (16, prompt_len) prompt ids, every one exactly prompt_len tokens."""
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = load_causal_lm(MODEL)
    tokenizer = load_tokenizer(MODEL)
    rows = [ids[-prompt_len:] for ids in encode_prompts(tokenizer, PROMPTS)]
    assert all(len(r) == prompt_len for r in rows), "a prompt is shorter than --prompt-len"
    return model, tokenizer, torch.tensor(rows, dtype=torch.long)


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float, float]:
    """(output, seconds of the warm-up call, best seconds of ``repeats`` more calls)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def hf_generate(model, tokenizer, ids: torch.Tensor, new_tokens: int, **extra) -> torch.Tensor:
    """``sample_responses``' own ``generate`` call (greedy), with extra GenerationConfig fields."""
    from rlhfkit.generation import SamplingParams, _without_model_defaults, sampling_config, truncate_after_eos

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = sampling_config(SamplingParams(max_new_tokens=new_tokens, temperature=0), eos, pad)
    for key, value in extra.items():
        setattr(config, key, value)
    with torch.no_grad(), _without_model_defaults(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return truncate_after_eos(out[:, ids.shape[1] :], eos, pad)


@torch.no_grad()
def manual_greedy(model, tokenizer, ids: torch.Tensor, new_tokens: int, logits_to_keep: int) -> torch.Tensor:
    """A plain KV-cached greedy loop: one forward per token, nothing else; stops when every row ended
    (as ``generate`` does), ended rows get padding."""
    from transformers import DynamicCache

    from rlhfkit.generation import truncate_after_eos

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=logits_to_keep)
    logits = logits.logits[:, -1, :]
    ended = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    for step in range(new_tokens):
        token = logits.argmax(-1).masked_fill(ended, pad)
        out.append(token)
        ended |= token == eos
        if step == new_tokens - 1 or bool(ended.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = model(input_ids=token[:, None], attention_mask=mask, cache=cache, use_cache=True).logits[:, -1, :]
    return truncate_after_eos(torch.stack(out, 1), eos, pad)


@torch.no_grad()
def matmuls_only(model, batch: int, new_tokens: int) -> None:
    """What the decode steps' matmuls alone cost: every ``nn.Linear`` of the model (the LM head
    included) on a (batch, in_features) input, ``new_tokens`` times; no attention, norms, cache or
    model code. The prefill is left out."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}
    for _ in range(new_tokens):
        for m in linears:
            m(inputs[m.in_features])


def compiled_child(args: argparse.Namespace) -> None:
    """``--child-compiled B``: lever (c) in this process; prints ``RESULT {json}``."""
    from transformers import CompileConfig

    model, tokenizer, prompts = setup(args.prompt_len)
    ids = prompts[: args.child_compiled]
    compile_config = CompileConfig(mode="default", dynamic=False)
    compile_config._compile_all_devices = True

    def run() -> torch.Tensor:
        return hf_generate(
            model, tokenizer, ids, args.new_tokens, cache_implementation="static", compile_config=compile_config
        )

    out, first, best = timed(run, args.repeats)
    result = {"responses": out.tolist(), "first_s": first, "best_s": best}
    print("RESULT " + json.dumps(result), flush=True)


def run_compiled(args: argparse.Namespace, batch: int) -> dict:
    """Lever (c) in a child process (a compile that fails or hangs does not take the bench down)."""
    cmd = [sys.executable, __file__, "--child-compiled", str(batch)]
    cmd += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --compile-timeout {args.compile_timeout} s (compile on 2 CPU cores)"}
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"compile failed (exit {proc.returncode}): {tail[:200]}"}
    return {**json.loads(lines[-1][len("RESULT ") :]), "child_wall_s": wall}


class _Inline:
    """Stands in for a request's event loop and queue: ``ServeEngine`` events land in a list."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)

    def put_nowait(self, event: tuple) -> None:
        self.events.append(event)


def serve_rows(engine, ids: torch.Tensor, new_tokens: int, stream: bool) -> tuple[list[str], int]:
    """Decode every row of ``ids`` as one single-choice job through ``ServeEngine._generate``:
    (the texts, tokens decoded, EOS included)."""
    from rlhfkit.serving.server import Job

    sink = _Inline()
    jobs = [
        Job(MODEL, None, [row], 1, new_tokens, 0.0, 1.0, [], 0, stream, loop=sink, events=sink)  # type: ignore[arg-type]
        for row in ids.tolist()
    ]
    engine._generate(jobs)
    texts, tokens = [], 0
    for event in sink.events:
        if event[0] == "done":
            texts.append(event[2])
            tokens += event[4]
    assert len(texts) == len(jobs), sink.events[-1:]
    return texts, tokens


def fmt_row(batch: int, lever: str, tokens: int, seconds: float, floors: dict, same: str, note: str = "") -> str:
    rate = tokens / seconds
    # Floors are for batch * new_tokens tokens; a row that decoded fewer is held to a proportionally smaller floor.
    share = tokens / floors["tokens"]
    x_mem = seconds / (floors["memory_s"] * share)
    x_flop = seconds / (floors["compute_s"] * share)
    return (
        f"| {batch} | {lever} | {rate:.1f} | {floors['memory_tok_s']:.1f} | {floors['compute_tok_s']:.1f} "
        f"| {x_mem:.2f} | {x_flop:.2f} | {same} | {note} |"
    )


def measure_batch(args: argparse.Namespace, model, tokenizer, engine, prompts: torch.Tensor, batch: int) -> list[dict]:
    """Every lever's rows for one batch size (tokens, warm-up and best seconds, same tokens as (a))."""
    from rlhfkit.generation import SamplingParams, sample_batch

    ids = prompts[:batch]
    rows: list[dict] = []

    def add(lever: str, out, first: float, best: float, note: str = "", tokens: int | None = None) -> None:
        tokens = tokens if tokens is not None else out.shape[0] * out.shape[1]
        rows.append({"lever": lever, "tokens": tokens, "first_s": first, "best_s": best, "out": out, "note": note})
        print(f"# batch {batch} {lever}: {tokens / best:.1f} tok/s (first call {first:.2f} s)", flush=True)

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    today, first, best = timed(
        lambda ids=ids: sample_batch(model, tokenizer, ids, torch.ones_like(ids), params), args.repeats
    )
    add("(a) today: sample_batch (generate, DynamicCache)", today.responses, first, best)
    out, first, best = timed(
        lambda ids=ids: hf_generate(model, tokenizer, ids, args.new_tokens, cache_implementation="static"),
        args.repeats,
    )
    add("(b) generate, static cache", out, first, best)
    if not args.no_compile:
        res = run_compiled(args, batch)
        if "error" in res:
            rows.append({"lever": "(c) generate, static cache, compiled", "error": res["error"]})
            print(f"# batch {batch} compiled: {res['error']}", flush=True)
        else:
            note = f"first call (compile) {res['first_s']:.0f} s"
            responses = torch.tensor(res["responses"])
            add("(c) generate, static cache, compiled", responses, res["first_s"], res["best_s"], note)
    out, first, best = timed(lambda ids=ids: manual_greedy(model, tokenizer, ids, args.new_tokens, 0), args.repeats)
    add("(d) manual loop, full logits", out, first, best)
    out, first, best = timed(lambda ids=ids: manual_greedy(model, tokenizer, ids, args.new_tokens, 1), args.repeats)
    add("(e) manual loop, last logits", out, first, best)
    _, first, best = timed(lambda: matmuls_only(model, batch, args.new_tokens), args.repeats)
    note = "not a decoder: the decode steps' Linear layers alone (no prefill, attention, norms)"
    add("(f) matmuls alone", None, first, best, note, tokens=batch * args.new_tokens)
    if engine is not None:
        for stream in (False, True):
            result: dict = {}

            def serve(ids=ids, stream=stream, result=result) -> torch.Tensor:
                result["texts"], result["tokens"] = serve_rows(engine, ids, args.new_tokens, stream)
                return torch.empty(0)

            _, first, best = timed(serve, args.repeats)
            lever = "serve decode loop" + (", streaming" if stream else "")
            same = result["texts"] == today.texts
            rows.append({"lever": lever, "tokens": result["tokens"], "first_s": first, "best_s": best, "same": same})
            print(f"# batch {batch} {lever}: {result['tokens'] / best:.1f} tok/s", flush=True)
    for row in rows:
        if "out" in row:
            out = row.pop("out")
            row["same"] = None if out is None else torch.equal(out, today.responses)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile-timeout", type=int, default=240)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--child-compiled", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_compiled:
        compiled_child(args)
        return

    started = time.perf_counter()
    model, tokenizer, prompts = setup(args.prompt_len)
    cfg = model.config.to_dict()
    rates_start = {"gflops": matmul_gflops(), **memory_gbps()}
    print(f"# machine rates at start: {json.dumps(rates_start)}", flush=True)
    engine = None
    if not args.no_serve:
        from rlhfkit.serving.server import ServeEngine

        engine = ServeEngine(MODEL, device="cpu", dtype="fp32")

    measured = {batch: measure_batch(args, model, tokenizer, engine, prompts, batch) for batch in args.batches}

    rates_end = {"gflops": matmul_gflops(), **memory_gbps()}
    gflops = max(rates_start["gflops"], rates_end["gflops"])
    gbps = max(rates_start["floor"], rates_end["floor"])
    print()
    print(
        f"Machine, measured in this run (start / end; the floors use the better): fp32 matmul 2048^3 "
        f"{rates_start['gflops']:.0f} / {rates_end['gflops']:.0f} GFLOP/s; memory copy (read + written) "
        f"{rates_start['copy']:.1f} / {rates_end['copy']:.1f} GB/s, read-only sum {rates_start['read']:.1f} / "
        f"{rates_end['read']:.1f} GB/s; {THREADS} threads. Prompt {args.prompt_len} tokens, {args.new_tokens} "
        f"new tokens, greedy, best of {args.repeats} after a warm-up; bench wall {time.perf_counter() - started:.0f} s."
    )
    print()
    print("| batch | lever | tok/s | mem floor tok/s | FLOP floor tok/s | x mem | x FLOP | same tokens as (a) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    footer: list[str] = []
    for batch, rows in measured.items():
        floors = decode_floors(cfg, batch, args.prompt_len, args.new_tokens, gflops, gbps)
        floors["tokens"] = batch * args.new_tokens
        for row in rows:
            if "error" in row:
                print(f"| {batch} | {row['lever']} | - | | | | | | {row['error']} |")
                continue
            note = row.get("note", "")
            if row["tokens"] != floors["tokens"]:
                note = (note + "; " if note else "") + f"{row['tokens']} tokens decoded"
            same = {True: "yes", False: "no", None: "n/a"}[row["same"]]
            print(fmt_row(batch, row["lever"], row["tokens"], row["best_s"], floors, same, note))
        footer.append(
            f"Batch {batch}: {floors['weight_bytes'] / 1e6:.0f} MB of weights read per forward, KV cache "
            f"{floors['kv_bytes_per_token'] / 1e3:.0f} kB per row per position, {floors['flops'] / 1e9:.1f} GFLOP "
            f"in all; memory floor {floors['memory_s']:.2f} s, FLOP floor {floors['compute_s']:.2f} s."
        )
    print()
    print("\n".join(footer))
    if args.json:
        args.json.write_text(
            json.dumps({"rates_start": rates_start, "rates_end": rates_end, "rows": measured}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()

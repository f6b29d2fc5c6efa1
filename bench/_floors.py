"""Compute floors of rlhfkit's PPO step phases: the phase's FLOPs over this CPU's measured fp32 matmul rate.

    .venv/bin/python bench/_floors.py SETTINGS.json PREPARED.json

Prints (prefixed ``BENCH ``) one JSON object: ``gflops`` (the best rate of large fp32 matrix
products on this machine, torch's default threads) and, per PPO step, the FLOPs of each phase of
rlhfkit's step as it computes it:

- generate: prefill of the left-padded prompts through every layer, then one token per row per
  step (KV cache), the LM head on the last position only; ``max_new_tokens`` steps (a batch stops
  early only when every row has ended, rare at 32 tokens).
- score: the frozen lower layers once over ``prompt + response + 1`` columns; the top layers three
  times (policy + value with the LoRA, reference without, reward adapter over the extra EOS column
  too), the LM head on the response positions twice.
- train: per PPO epoch and mini-batch, the top layers and the LM head forward, and backward: the
  input gradients of every matmul above the cache (as many FLOPs as forward) plus the LoRA weights'
  gradients.

Only matmuls and attention count (norms, softmax, sampling and the optimizer are left out), and
the rate is the best large-GEMM rate, so a floor is a lower bound: no implementation gets below it.

Decoding has a second floor (``decode_floors``, used by ``decode_levers.py``): at batch 1 a decode
step is memory-bound, every weight (and the KV cache so far) read once per token, so its floor is
those bytes over the measured memory bandwidth (``memory_gbps``); batched, the FLOPs over the matmul
rate bind instead. Both are printed; the larger one is the step's floor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate (n x n x n) with torch's threads, in GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def memory_gbps(mib: int = 256, repeats: int = 10) -> dict[str, float]:
    """Best memory rates of this machine with torch's threads, in GB/s (1e9 bytes), best of ``repeats``:

    - ``copy``: ``dst.copy_(src)`` of a ``mib`` MiB fp32 tensor, bytes read + bytes written over seconds;
    - ``read``: ``src.sum()`` of the same tensor, bytes read over seconds (a read-only stream, like
      a decode step's weight reads).

    ``floor``: the larger of the two, the bandwidth ``decode_floors`` divides by (the best this machine
    showed, so the floor stays a lower bound). Well above the last-level cache, so it is DRAM's rate.
    """
    import torch

    src = torch.empty(mib * 2**20 // 4).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault the pages in
    src.sum()
    copy = read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        read = min(read, time.perf_counter() - t0)
    rates = {"copy": 2 * src.nbytes / copy / 1e9, "read": src.nbytes / read / 1e9}
    return {**rates, "floor": max(rates.values())}


def _layer_shapes(cfg: dict) -> tuple[list[tuple[int, int]], int, int]:
    """The matmul weight shapes of one decoder layer, the KV width and the head dimension."""
    d, ffn, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    shapes = [(d, heads * head_dim), (d, kv), (d, kv), (heads * head_dim, d), (d, ffn), (d, ffn), (ffn, d)]
    return shapes, kv, head_dim


def decode_floors(
    cfg: dict, batch: int, prompt_len: int, new_tokens: int, gflops: float, gbps: float, dtype_bytes: int = 4
) -> dict[str, float]:
    """Floors of one greedy ``generate`` of ``new_tokens`` per row after a ``prompt_len`` prompt (no padding).

    The work: one prefill forward over the prompt, then ``new_tokens - 1`` one-token forwards with a KV
    cache; the LM head on the last position only.

    - ``memory_s``: every forward reads every weight once (the layers, the norms, the LM head; the
      embedding lookup reads ``batch`` rows only, left out) plus the KV cache written so far, each
      forward's bytes over ``gbps``. What binds at batch 1.
    - ``compute_s``: the matmul and attention FLOPs (``2 * params`` per token through the layers, the
      head once per row per forward, QK^T and AV over the context) over ``gflops``. What binds batched.
    - ``floor_s``: the larger; ``*_tok_s``: ``batch * new_tokens`` over each.
    - ``weight_bytes``, ``kv_bytes_per_token`` (one row, one position, all layers), ``flops``.
    """
    shapes, kv, head_dim = _layer_shapes(cfg)
    d, vocab, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    layer_params = sum(i * o for i, o in shapes) + 2 * d  # matmuls + two RMSNorm weights
    weight_bytes = dtype_bytes * (n_layers * layer_params + d + vocab * d)  # + final norm + LM head
    kv_token = dtype_bytes * n_layers * 2 * kv
    # KV bytes read: the prefill reads what it writes (counted once), each later forward reads the cache so far.
    kv_read = batch * kv_token * (prompt_len + sum(prompt_len + i for i in range(1, new_tokens)))
    memory_bytes = new_tokens * weight_bytes + kv_read

    layer = 2 * sum(i * o for i, o in shapes)
    head = 2 * d * vocab
    attention = 4 * heads * head_dim  # per (query, key) pair: QK^T and AV
    prefill = batch * (prompt_len * n_layers * layer + n_layers * attention * prompt_len * (prompt_len + 1) / 2 + head)
    decode = sum(batch * (n_layers * (layer + attention * (prompt_len + i)) + head) for i in range(1, new_tokens))
    flops = prefill + decode

    memory_s, compute_s = memory_bytes / (gbps * 1e9), flops / (gflops * 1e9)
    tokens = batch * new_tokens
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_token,
        "memory_bytes": memory_bytes,
        "flops": flops,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "floor_s": max(memory_s, compute_s),
        "memory_tok_s": tokens / memory_s,
        "compute_tok_s": tokens / compute_s,
        "floor_tok_s": tokens / max(memory_s, compute_s),
    }


def step_flops(cfg: dict, s: dict, query_width: int) -> dict[str, float]:
    """FLOPs of each phase of one rlhfkit PPO step (see the module docstring)."""
    d, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    n_layers = cfg["num_hidden_layers"]
    upper = n_layers if s["trainable_layers"] == 0 else min(s["trainable_layers"], n_layers)
    lower = n_layers - upper
    shapes = [(d, heads * head_dim), (d, kv), (d, kv), (heads * head_dim, d), (d, ffn), (d, ffn), (ffn, d)]
    layer = 2 * sum(i * o for i, o in shapes)  # matmul FLOPs per token per layer
    lora = 2 * s["lora_r"] * sum(i + o for i, o in shapes)  # the adapters' extra FLOPs per token per layer
    head = 2 * d * vocab  # LM head per position
    b, t, q = s["batch_size"], s["max_new_tokens"], query_width
    length = q + t

    def attention(tokens_ctx: float) -> float:  # QK^T and AV over the given sum of context lengths
        return 4 * heads * head_dim * tokens_ctx

    causal = length * (length + 1) / 2  # sum of context lengths over a causal sequence
    prefill = b * (q * n_layers * layer + n_layers * attention(q * (q + 1) / 2) + head)
    decode = sum(b * (n_layers * (layer + attention(q + i)) + head) for i in range(1, t))
    generate = prefill + decode + b * upper * lora * length

    causal_ext = (length + 1) * (length + 2) / 2  # with the extra EOS column the reward reads
    lower_pass = b * lower * ((length + 1) * layer + attention(causal_ext))
    policy_pass = b * upper * (length * (layer + lora) + attention(causal))
    reference_pass = b * upper * (length * layer + attention(causal))  # adapters off
    reward_pass = b * upper * ((length + 1) * (layer + lora) + attention(causal_ext))
    score = lower_pass + policy_pass + reference_pass + reward_pass + 2 * b * t * head

    forward = policy_pass + b * t * head  # over the whole batch, once per epoch
    weight_grads = b * upper * length * lora  # LoRA weight gradients (as many FLOPs as their forward)
    train = s["ppo_epochs"] * (2 * forward + weight_grads)
    return {"generate": generate, "score": score, "train": train}


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    cfg = json.loads((Path(prepared["model_path"]) / "config.json").read_text())
    queries = json.loads(Path(prepared["queries_file"]).read_text())
    b = s["batch_size"]
    steps = []
    for i in range(s["steps"]):
        width = max(len(x) for x in queries[i * b : (i + 1) * b])
        steps.append({"query_width": width, **step_flops(cfg, s, width)})
    print("BENCH " + json.dumps({"gflops": matmul_gflops(), "steps": steps}), flush=True)


if __name__ == "__main__":
    main()

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

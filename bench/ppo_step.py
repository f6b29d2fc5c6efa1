"""Seconds per PPO step, split into generation, scoring and training; tokens/s; peak RSS.

Runs each model in its own process (so peak RSS is that run's alone) and prints one table:

    .venv/bin/python bench/ppo_step.py                       # tiny-random and smollm2-135m
    .venv/bin/python bench/ppo_step.py --models tiny-random --steps 3

The reward is a reward model on the policy's own backbone (an untrained LoRA adapter + head made
for the benchmark: the same compute as a trained one), so the run exercises the shared-base design:
policy, reference, value and reward all on one frozen copy of the weights. For comparison the
benchmark also measures the peak RSS of holding four separate resident copies of the model (policy,
reference, value, reward): the weights a four-model PPO holds before any activation or optimizer state.
Set GLIBC_TUNABLES as the Makefile does: without it timings here swing up to 3x.

``generate floor s``: the generate phase's matmul and attention FLOPs (``bench/_floors.py``
``step_flops``: prefill of the left-padded prompts, ``max_new_tokens`` decode steps with the KV cache,
the LM head on the last position) over the best fp32 2048^3 GEMM rate measured in the same child
before and after its run (``fp32 GFLOP/s``); ``generate / floor`` is the measured median over it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_reward_dir(model: str, folder: Path, trainable_layers: int) -> None:
    """An untrained reward model on ``model``'s backbone, in the layout `rlhf reward train` writes."""
    import yaml
    from peft import get_peft_model
    from safetensors.torch import save_file

    from rlhfkit.models import load_causal_lm, lora_config, num_layers
    from rlhfkit.reward import new_head

    base = load_causal_lm(model)
    split = max(0, num_layers(base) - trainable_layers)
    peft_model = get_peft_model(base, lora_config(base, 16, 32, first_layer=split))
    peft_model.save_pretrained(folder / "adapter")
    head = new_head(base.config.hidden_size, 0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / "head.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    (folder / "metrics.json").write_text(json.dumps({"score_mean": 0.0, "score_std": 1.0}))


def child_ppo(args: argparse.Namespace) -> None:
    """Runs in a fresh process: a few PPO steps, then one JSON line of timings."""
    import torch
    from _floors import matmul_gflops, step_flops

    from rlhfkit.data import write_jsonl
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import resolve_model_path
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    gflops_before = matmul_gflops()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    make_reward_dir(args.model, work / "rm", args.trainable_layers)
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"Write a short poem about {t}."} for t in topics * 8])
    cfg = PPOConfig(
        reward=str(work / "rm"),
        prompts=str(work / "prompts.jsonl"),
        out=str(work / "run"),
        policy=args.model,
        max_steps=args.steps + 1,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens,
        trainable_layers=args.trainable_layers,
        missing_eos_penalty=None,
        save_every=0,
    )
    trainer = PPOTrainer(cfg)
    trainer.train()
    gflops = max(gflops_before, matmul_gflops())
    # The generate phase's floor: its matmul + attention FLOPs (bench/_floors.py) over the best fp32 GEMM
    # rate measured before and after. Every batch is left-padded to its longest prompt; the widest prompt
    # is used for all (the topics differ by a token or two), and every row decodes max_new_tokens.
    model_cfg = json.loads((Path(resolve_model_path(args.model)) / "config.json").read_text())
    width = max(
        len(ids) for ids in encode_prompts(trainer.tokenizer, [f"Write a short poem about {t}." for t in topics])
    )
    settings = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "trainable_layers": args.trainable_layers,
        "lora_r": cfg.lora_r,
        "ppo_epochs": args.ppo_epochs,
    }
    generate_flops = step_flops(model_cfg, settings, width)["generate"]
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][1:]  # warm-up
    tokens = [r["response_length"] * cfg.batch_size for r in rows]
    result = {
        "model": args.model,
        "seconds_per_step": statistics.median(r["seconds"] for r in rows),
        "generate": statistics.median(r["time_generate"] for r in rows),
        "score": statistics.median(r["time_score"] for r in rows),
        "train": statistics.median(r["time_train"] for r in rows),
        "gen_tokens_per_s": sum(tokens) / sum(r["time_generate"] for r in rows),
        "peak_rss_mb": peak_rss_mb(),
        "gflops": gflops,
        "generate_gflop": generate_flops / 1e9,
        "generate_floor_s": generate_flops / (gflops * 1e9),
    }
    print("RESULT " + json.dumps(result), flush=True)


def child_four_models(args: argparse.Namespace) -> None:
    """Peak RSS of four separate copies of the model: the memory floor of a four-model PPO."""
    from rlhfkit.models import load_causal_lm

    models = [load_causal_lm(args.model) for _ in range(4)]
    for model in models:  # resident copies, as four trained/used models are (not shared read-only mmaps)
        for param in model.parameters():
            param.data = param.data.clone()
    print("RESULT " + json.dumps({"model": args.model, "peak_rss_mb": peak_rss_mb(), "copies": len(models)}))


def run_child(kind: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--models", model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--mini-batch-size", str(args.mini_batch_size),
           "--ppo-epochs", str(args.ppo_epochs), "--max-new-tokens", str(args.max_new_tokens),
           "--trainable-layers", str(args.trainable_layers)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run for {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--trainable-layers", type=int, default=4)
    parser.add_argument("--child", choices=["ppo", "four"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model = args.models
        (child_ppo if args.child == "ppo" else child_four_models)(args)
        return

    from rich.console import Console
    from rich.table import Table

    title = (
        f"PPO step: batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.ppo_epochs} epochs "
        f"x mini-batch {args.mini_batch_size}, LoRA top {args.trainable_layers} layers"
    )
    table = Table(title=title)
    for column in ("model", "s/step", "generate s", "generate floor s", "generate / floor", "score s", "train s",
                   "gen tok/s", "peak RSS MB", "4 separate models RSS MB", "fp32 GFLOP/s"):  # fmt: skip
        table.add_column(column, justify="right")
    for model in args.models.split(","):
        ppo = run_child("ppo", model, args)
        four = run_child("four", model, args)
        table.add_row(
            model,
            f"{ppo['seconds_per_step']:.2f}",
            f"{ppo['generate']:.2f}",
            f"{ppo['generate_floor_s']:.2f}",
            f"{ppo['generate'] / ppo['generate_floor_s']:.1f}x",
            f"{ppo['score']:.2f}",
            f"{ppo['train']:.2f}",
            f"{ppo['gen_tokens_per_s']:.0f}",
            f"{ppo['peak_rss_mb']:.0f}",
            f"{four['peak_rss_mb']:.0f}",
            f"{ppo['gflops']:.0f}",
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()

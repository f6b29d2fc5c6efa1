"""RLOO side by side: rlhfkit's `rlhf rloo` against TRL 1.16.0's RLOOTrainer, same work, one machine, one invocation.

    .venv/bin/python bench/rloo_vs_trl.py --quick   # 1 warm-up + 3 timed steps a side, 8 prompts x 2 completions
    .venv/bin/python bench/rloo_vs_trl.py           # 1 + 15 steps a side (rlhfkit's defaults); writes RESULTS.md

Same work on both sides: the default policy (SmolLM2-135M-Instruct), the same LoRA (rank, alpha,
target modules, top layers), the same reward model (the PPO benchmark's: trained once with rlhfkit,
exported to TRL, scores normalised the same way), the same prompts in the same groups and steps,
completions per prompt, mini-batch, passes, max new tokens, temperature, learning rate, KL
coefficient (k1 summed over the response, in the sequence reward), clip epsilon on the sequence
ratio, advantage whitening (off), gradient clipping and seed. Each side runs in its own process, one
after the other, with the allocator tunables set. Reported: median seconds per step (one generation
batch: rollout, scoring and its optimizer steps) after the warm-up, steps per second, peak RSS of
each process, and reward, KL and response length per step on both sides; the fp32 matmul rate
before and after.

The last line is exactly ``rloo speedup vs TRL: X.XXx, peak memory ratio: Y.YY`` (speedup = TRL's
seconds per step / ours; memory ratio = our peak RSS / TRL's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _online_vs_trl import SHARED_DIFFERENCES, Algo, main

DIFFERENCES = [
    *SHARED_DIFFERENCES,
    "Flat steps: rlhfkit skips the update of a step where every group's scores are equal; TRL still steps (the "
    "KL part of the reward only). Rare with a reward model.",
    "Gradient checkpointing (on by default on both sides; --gradient-checkpointing off turns it off on both): "
    "rlhfkit recomputes the policy's trained layers in backward and its LM head in slices of 64 positions; TRL "
    "uses transformers' checkpointing of every decoder layer.",
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL coefficient in the reward (TRL's beta)")
    p.add_argument("--normalize-advantages", action="store_true", help="whiten the advantages over the batch")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"kl_coef": args.kl_coef, "normalize_advantages": args.normalize_advantages}


def rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    whitened = "whitened" if s["normalize_advantages"] else "not whitened"
    return [
        ("sequence reward", f"score - {s['kl_coef']} x KL (k1 summed over the response), fixed", "same (beta)"),
        ("advantages", f"reward - mean of the prompt's other rewards (leave-one-out), {whitened}", "same"),
        ("loss", "clipped sequence-level ratio, mean over the mini-batch", "same"),
    ]


RLOO = Algo(
    name="rloo",
    title="RLOO",
    quick=(8, 2, 8),
    full=(8, 2, 8),
    kl_meaning="k1 to the reference per response token (the reward subtracts it summed per response), at sampling",
    differences=DIFFERENCES,
    add_args=add_args,
    settings=settings,
    rows=rows,
)

if __name__ == "__main__":
    main(RLOO)

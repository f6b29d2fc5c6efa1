"""GRPO side by side: rlhfkit's `rlhf grpo` against TRL 1.16.0's GRPOTrainer, same work, one machine, one invocation.

    .venv/bin/python bench/grpo_vs_trl.py --quick   # 1 warm-up + 3 timed steps a side, 4 prompts x 4 completions
    .venv/bin/python bench/grpo_vs_trl.py           # 1 + 15 steps a side, 4 x 8 (rlhfkit's defaults); RESULTS.md

Same work on both sides: the default policy (SmolLM2-135M-Instruct), the same LoRA (rank, alpha,
target modules, top layers), the same reward model (the PPO benchmark's: trained once with rlhfkit,
exported to TRL, scores normalised the same way), the same prompts in the same groups and steps,
completions per prompt, mini-batch, passes, max new tokens, temperature, learning rate, beta (k3 KL
in the loss), clip epsilon, loss aggregation (dapo), reward scaling (group), gradient clipping and
seed. Each side runs in its own process, one after the other, with the allocator tunables set.
Reported: median seconds per step (one generation batch: rollout, scoring and its optimizer steps)
after the warm-up, steps per second, peak RSS of each process, and reward, KL and response length
per step on both sides; the fp32 matmul rate before and after.

The last line is exactly ``grpo speedup vs TRL: X.XXx, peak memory ratio: Y.YY`` (speedup = TRL's
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
    "dapo normaliser: both divide a mini-batch's summed token loss by the generation batch's token count / its "
    "number of mini-batches (TRL's steps_per_generation; rlhfkit since 2026-12-02 15:10, before which it divided by "
    "the mini-batch's own count, TRL's bnpo: the quick run of that day measured the earlier rule).",
    "Old log-probs: rlhfkit keeps the sampling policy's log-probs from the rollout's scoring pass; TRL computes "
    "them in an extra forward pass when the batch is split into several optimizer steps (else it reuses the "
    "detached current ones).",
    "Flat steps: rlhfkit skips the update of a step where every group scored the same; TRL still steps (the KL term "
    "only). Rare with a reward model.",
    "Gradient checkpointing (on by default on both sides; --gradient-checkpointing off turns it off on both): "
    "rlhfkit recomputes the policy's trained layers in backward and its LM head in slices of 64 positions; TRL "
    "uses transformers' checkpointing of every decoder layer.",
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beta", type=float, default=0.04, help="k3 KL weight in the loss (rlhfkit's default)")
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "dapo", "dr_grpo"])
    p.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"beta": args.beta, "loss_type": args.loss_type, "scale_rewards": args.scale_rewards}


def rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("advantages", f"(reward - group mean) / (group std + 1e-4), scale_rewards {s['scale_rewards']}", "same"),
        ("loss", f"clipped per-token ratio, loss_type {s['loss_type']}, k3 KL in the loss, beta {s['beta']}", "same"),
    ]


GRPO = Algo(
    name="grpo",
    title="GRPO",
    quick=(4, 4, 8),
    full=(4, 8, 8),
    kl_meaning="k3 to the reference per response token, as the loss sees it, mean over the step's mini-batches",
    differences=DIFFERENCES,
    add_args=add_args,
    settings=settings,
    rows=rows,
)

if __name__ == "__main__":
    main(GRPO)

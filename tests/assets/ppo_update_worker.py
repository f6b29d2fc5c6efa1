"""One PPO update from a saved rollout batch, on this process's share of its rows (started by torchrun).

argv: settings JSON, rollout file, output file. Rank 0 writes the trainable weights after the update
(whole, also when sharded), the step's metrics and the share of the parameters each rank holds.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from accelerate.utils import gather_object
from safetensors.torch import save_file

from rlhfkit.distributed import make_accelerator
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer
from rlhfkit.rl.rollout import Rollout


def rows_of(r: Rollout, start: int, stop: int) -> Rollout:
    """Rows ``start:stop`` of a rollout batch (every per-row field)."""
    cut = {
        f.name: getattr(r, f.name)[start:stop]
        for f in dataclasses.fields(r)
        if f.name not in ("query_len", "group_size") and getattr(r, f.name) is not None
    }
    return dataclasses.replace(r, **cut)


def main() -> None:
    settings, rollout_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    accelerator = make_accelerator(find_unused_parameters=True)
    trainer = PPOTrainer(PPOConfig(**settings), accelerator=accelerator)
    rollout = Rollout(**torch.load(rollout_file, weights_only=False))
    share = rollout.ids.shape[0] // accelerator.num_processes
    start = accelerator.process_index * share
    metrics = trainer.ppo_step(rows_of(rollout, start, start + share))
    held = [sum(local_numel(p) for p in trainer.core.parameters()) / sum(p.numel() for p in trainer.core.parameters())]
    shares = gather_object(held) if accelerator.num_processes > 1 else held
    weights = trainer.trainable_weights()
    if accelerator.is_main_process:
        save_file(weights, out_file)
        with open(out_file + ".json", "w") as f:
            json.dump({**metrics, "parameter_shares": shares}, f)
    accelerator.wait_for_everyone()


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores (a sharded DTensor keeps only its slice)."""
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


if __name__ == "__main__":
    main()

"""rlhfkit's side of `grpo_vs_trl.py` and `rloo_vs_trl.py`: steps of `rlhf grpo` / `rlhf rloo`, in the project's venv.

    .venv/bin/python bench/_online_ours_worker.py grpo|rloo SETTINGS.json PREPARED.json OUT_DIR

Prints (each line prefixed ``BENCH ``) one JSON object per step, read from the run's
``metrics.jsonl`` once training ends: ``step``, ``seconds``, ``reward`` (mean normalised
reward-model score), ``kl_token`` (GRPO: the k3 KL to the reference per token, as its loss sees it;
RLOO: the k1 KL per response token, as its reward subtracts it), ``response_length`` and the phase
split; before them one with ``trainable_params`` (the policy's LoRA weights), after them one with
``peak_rss_mb`` (``ru_maxrss`` of this process: model loads, rollouts, training).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

# Settings passed to rlhfkit's config as they are (the parent's settings carry them under these names).
CONFIG_KEYS = (
    "batch_size",
    "num_generations",
    "mini_batch_size",
    "num_iterations",
    "max_new_tokens",
    "max_prompt_tokens",
    "temperature",
    "learning_rate",
    "epsilon",
    "max_grad_norm",
    "normalize_reward",
    "lora_r",
    "lora_alpha",
    "trainable_layers",
    "gradient_checkpointing",
    "seed",
)


def trainer_for(algo: str, s: dict[str, Any], prepared: dict[str, Any], out: Path) -> Any:
    """rlhfkit's GRPOTrainer / RLOOTrainer on the benchmark's settings (everything else at its default)."""
    common: dict[str, Any] = {key: s[key] for key in CONFIG_KEYS}
    common.update(
        reward=prepared["reward_dir"],
        prompts=prepared["prompts_file"],
        out=str(out),
        policy=s["model"],
        max_steps=s["steps"],
        save_every=0,
        missing_eos_penalty=None,
    )
    if algo == "grpo":
        from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer

        return GRPOTrainer(
            GRPOConfig(**common, beta=s["beta"], loss_type=s["loss_type"], scale_rewards=s["scale_rewards"])
        )
    from rlhfkit.rl.rloo import RLOOConfig, RLOOTrainer

    return RLOOTrainer(RLOOConfig(**common, kl_coef=s["kl_coef"], normalize_advantages=s["normalize_advantages"]))


def step_row(algo: str, row: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's view of one metrics.jsonl row (the same keys the TRL worker prints)."""
    # GRPO logs the mean k3 per token of its training passes; RLOO the k1 summed over each response.
    kl_token = row["kl_ref"] if algo == "grpo" else row["kl"] / max(row["response_length"], 1e-9)
    names = {"time_generate": "generate", "time_score": "score", "time_train": "train"}
    return {
        "step": row["step"],
        "seconds": row["seconds"],
        "reward": row["reward_mean"],
        "kl_token": kl_token,
        "response_length": row["response_length"],
        "eos_rate": row["eos_rate"],
        **{short: row[key] for key, short in names.items()},
    }


def main() -> None:
    algo, settings_file, prepared_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    if algo not in ("grpo", "rloo"):
        raise SystemExit(f"unknown algorithm {algo!r} (grpo or rloo)")
    trainer = trainer_for(algo, json.loads(settings_file.read_text()), json.loads(prepared_file.read_text()), out)
    print("BENCH " + json.dumps({"trainable_params": sum(p.numel() for p in trainer.policy_params)}), flush=True)
    trainer.train()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        print("BENCH " + json.dumps(step_row(algo, json.loads(line))), flush=True)
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()

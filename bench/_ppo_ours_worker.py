"""rlhfkit's side of `ppo_vs_trl.py`: PPO steps with rlhfkit's PPOTrainer, in the project's venv.

    .venv/bin/python bench/_ppo_ours_worker.py SETTINGS.json PREPARED.json OUT_DIR

Prints (each line prefixed ``BENCH ``) one JSON object per step (``step``, ``seconds``, ``reward``,
``kl`` and the phase split), then one with ``peak_rss_mb`` (``ru_maxrss`` of this process: model
loads, rollouts and training). The rows come from the run's ``metrics.jsonl`` once training ends.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])

    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    s = settings
    cfg = PPOConfig(
        reward=prepared["reward_dir"],
        prompts=prepared["prompts_file"],
        out=str(out),
        policy=s["model"],
        max_steps=s["steps"],
        batch_size=s["batch_size"],
        mini_batch_size=s["batch_size"] // s["num_mini_batches"],
        ppo_epochs=s["ppo_epochs"],
        max_new_tokens=s["max_new_tokens"],
        max_prompt_tokens=s["max_prompt_tokens"],
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        missing_eos_penalty=None,
        normalize_reward=s["normalize_reward"],
        whiten_rewards=s["whiten_rewards"],
        gamma=s["gamma"],
        lam=s["lam"],
        clip_range=s["clip_range"],
        clip_range_value=s["clip_range_value"],
        vf_coef=s["vf_coef"],
        max_grad_norm=math.inf if s["max_grad_norm"] is None else s["max_grad_norm"],
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        trainable_layers=s["trainable_layers"],
        # TRL 1.12's PPO loop cannot checkpoint activations; ours is off too, so the step is the same work.
        gradient_checkpointing=False,
        save_every=0,
        seed=s["seed"],
    )
    PPOTrainer(cfg).train()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        print(
            "BENCH "
            + json.dumps(
                {
                    "step": row["step"],
                    "seconds": row["seconds"],
                    "reward": row["reward_mean"],
                    "kl": row["kl"],
                    "response_length": row["response_length"],
                    "eos_rate": row["eos_rate"],
                    "generate": row["time_generate"],
                    "score": row["time_score"],
                    "train": row["time_train"],
                }
            ),
            flush=True,
        )
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()

"""TRL's side of `grpo_vs_trl.py` and `rloo_vs_trl.py`: the same steps with TRL 1.16's GRPOTrainer / RLOOTrainer.

    bench/.venv-trl-reward/bin/python bench/_online_trl_worker.py grpo|rloo SETTINGS.json PREPARED.json OUT_DIR

Runs in the TRL venv and imports nothing from rlhfkit: the policy comes from the safetensors
directory rlhfkit caches for the default model, the reward model from the export `_prepare.py`
wrote. Prints (each line prefixed ``BENCH ``) one JSON object with TRL's resolved settings, then one
per rlhfkit-sized step (one generation batch: ``steps_per_generation x num_iterations`` optimizer
steps of TRL, their seconds summed; ``reward`` = TRL's logged ``reward``; ``kl_token`` = its logged
``kl``: GRPO's k3 per token in the loss, RLOO's k1 per token in the reward), then ``peak_rss_mb``.

What the worker adds around TRL's trainer, and why:

- the reward: a callable in ``reward_funcs`` that scores the token ids rlhfkit scores: the prompt's
  ids + the completion's ids + an EOS where the completion was cut without one, through the exported
  sequence-classification model, pooled at the last token, with the normalised head (bias included,
  which Llama's ``score`` lacks). TRL's own model path would decode and re-tokenize
  ``prompt + completion`` (no EOS for a cut completion), which is not what rlhfkit's reward reads.
- the prompts: rlhfkit's formatted prompt texts, in the order its run takes them (TRL's shuffling
  off: the same groups in the same steps); the worker checks that TRL tokenizes them to rlhfkit's ids.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ppo_trl_worker import biased_head, lora_targets


def reward_function(trl_reward_dir: Path, eos_id: int, pad_id: int) -> Any:
    """A TRL reward function scoring ``query_ids + completion_ids (+ EOS)`` as rlhfkit's reward model does."""
    from transformers import AutoModelForSequenceClassification

    backbone = AutoModelForSequenceClassification.from_pretrained(trl_reward_dir, dtype=torch.float32).model.eval()
    head = biased_head(trl_reward_dir / "score_head.safetensors").eval()

    def reward_model(prompts: list, completions: list, completion_ids: list, query_ids: list, **_: Any) -> list:
        rows = [
            list(q) + list(c) + ([] if c and c[-1] == eos_id else [eos_id])
            for q, c in zip(query_ids, completion_ids, strict=True)
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.inference_mode():
            hidden = backbone(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False
            ).last_hidden_state
            pooled = hidden[torch.arange(len(rows)), mask.sum(-1) - 1]
            return head(pooled).squeeze(-1).tolist()

    return reward_model


def trl_config(algo: str, s: dict[str, Any], out: Path) -> tuple[Any, type]:
    """TRL's config and trainer class: one generation batch of ``batch_size x num_generations`` completions
    per rlhfkit step, split into mini-batches of ``mini_batch_size`` (one optimizer step each, no accumulation)."""
    completions = s["batch_size"] * s["num_generations"]
    steps_per_generation = completions // s["mini_batch_size"]
    common = {
        "output_dir": str(out),
        "seed": s["seed"],
        "per_device_train_batch_size": s["mini_batch_size"],
        "gradient_accumulation_steps": 1,
        "steps_per_generation": steps_per_generation,
        "num_generations": s["num_generations"],
        "num_iterations": s["num_iterations"],
        "max_steps": s["steps"] * steps_per_generation * s["num_iterations"],
        "max_completion_length": s["max_new_tokens"],
        "temperature": s["temperature"],
        "top_p": 1.0,
        "top_k": 0,
        "shuffle_dataset": False,
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_epsilon": s["adam_epsilon"],
        "weight_decay": s["weight_decay"],
        "max_grad_norm": s["max_grad_norm"],
        "epsilon": s["epsilon"],
        "gradient_checkpointing": s["gradient_checkpointing"],
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    if algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, beta=s["beta"], loss_type=s["loss_type"], scale_rewards=s["scale_rewards"])
        return config, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig(**common, beta=s["kl_coef"], normalize_advantages=s["normalize_advantages"]), RLOOTrainer


def main() -> None:
    algo = sys.argv[1]
    s = json.loads(Path(sys.argv[2]).read_text())
    prepared = json.loads(Path(sys.argv[3]).read_text())
    out = Path(sys.argv[4])

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if algo not in ("grpo", "rloo"):
        raise SystemExit(f"unknown algorithm {algo!r} (grpo or rloo)")

    torch.manual_seed(s["seed"])
    model_path = prepared["model_path"]
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.eos_token_id != prepared["eos_token_id"]:
        raise SystemExit(f"EOS {tok.eos_token_id} differs from rlhfkit's {prepared['eos_token_id']}")
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    n_layers = policy.config.num_hidden_layers
    first = n_layers - (min(s["trainable_layers"], n_layers) if s["trainable_layers"] else n_layers)
    peft_config = LoraConfig(
        r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=0.0,
        target_modules=lora_targets(policy),
        layers_to_transform=list(range(first, n_layers)) if first else None,
        bias="none",
        task_type="CAUSAL_LM",
    )

    # One row per prompt in rlhfkit's order; the text is rlhfkit's formatted prompt, checked to tokenize back.
    queries = json.loads(Path(prepared["queries_file"]).read_text())
    texts = [tok.decode(q) for q in queries]
    if tok(text=texts)["input_ids"] != queries:
        raise SystemExit("TRL would tokenize the prompts differently from rlhfkit")
    dataset = Dataset.from_dict({"prompt": texts, "query_ids": queries})
    args, trainer_class = trl_config(algo, s, out)
    per_step = args.steps_per_generation * s["num_iterations"]  # TRL optimizer steps per rlhfkit step

    class StepTimer(TrainerCallback):
        """Seconds of each optimizer step (from one ``on_step_end`` to the next) and its logs, printed
        summed per generation batch once the batch's last step has logged."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.steps: dict[int, dict[str, Any]] = {}

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            now = time.perf_counter()
            self.steps[state.global_step] = {"seconds": now - self.t0, "logs": {}}
            self.t0 = now

        def on_log(self, _args: Any, state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            step = state.global_step
            if step not in self.steps or "done" in self.steps[step]:
                return
            self.steps[step]["logs"].update(logs or {})
            if step % per_step == 0:
                self.steps[step]["done"] = True
                group = [self.steps[i] for i in range(step - per_step + 1, step + 1)]
                print("BENCH " + json.dumps(rollout_row(step // per_step, group)), flush=True)

    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_function(Path(prepared["trl_reward_dir"]), tok.eos_token_id, tok.pad_token_id),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    resolved = {
        "optim": str(getattr(args.optim, "value", args.optim)),
        "generation_batch_size": args.generation_batch_size,
        "steps_per_generation": args.steps_per_generation,
        "optimizer_steps": args.max_steps,
        "trainable_params": trainable,
    }
    print("BENCH " + json.dumps({"trl_args": resolved}), flush=True)
    trainer.train()
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def rollout_row(step: int, group: list[dict[str, Any]]) -> dict[str, Any]:
    """One rlhfkit-sized step from TRL's optimizer steps over one generation batch: the generation's
    metrics are logged with its first optimizer step, the loss's with every one."""

    def first(key: str) -> float | None:
        return next((g["logs"][key] for g in group if g["logs"].get(key) is not None), None)

    kls = [g["logs"]["kl"] for g in group if g["logs"].get("kl") is not None]
    return {
        "step": step,
        "seconds": sum(g["seconds"] for g in group),
        "reward": first("reward"),
        "kl_token": sum(kls) / len(kls) if kls else None,
        "response_length": first("completions/mean_length"),
        "loss": first("loss"),
    }


if __name__ == "__main__":
    main()

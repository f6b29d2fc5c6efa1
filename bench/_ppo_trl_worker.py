"""TRL's side of `ppo_vs_trl.py`: the same PPO steps with TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer``.

    bench/.venv-trl/bin/python bench/_ppo_trl_worker.py SETTINGS.json PREPARED.json OUT_DIR

Runs in the TRL venv and imports nothing from rlhfkit: the policy and value model come from the
safetensors directory rlhfkit caches for the default model, the reward model from the export that
`_prepare.py` wrote. Prints (each line prefixed ``BENCH ``) one JSON object with TRL's resolved
settings, one per step (``step``, ``seconds`` from one ``on_step_end`` to the next, ``reward`` =
``objective/scores``, ``kl`` = ``objective/kl``) and one with ``peak_rss_mb`` (``ru_maxrss`` of
this process).

What the worker adds around TRL's trainer, and why:

- pad token ``<|endoftext|>``: TRL finds where a response ends by its pad id, so pad must differ
  from EOS (SmolLM2's tokenizer pads with EOS; rlhfkit tracks lengths with masks instead).
- the reward model reads ``prompt + response + EOS`` (an EOS is appended to responses cut without
  one), as it was trained and as rlhfkit scores rollouts: a backbone wrapper inserts that EOS.
- the batches: TRL's dataloader is replaced by one that yields the prompts in the order rlhfkit's
  run consumes them (same batches on both sides), TRL's collator and ``accelerator.prepare`` kept.
- the value model: the same normalised reward head as rlhfkit's value head starts from, on the base
  backbone; with ``trl_value == "lora"`` only a LoRA like the policy's and the head train (TRL's own
  examples train every weight of the value model: ``trl_value == "full"``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


class EosReadingBackbone(nn.Module):
    """A decoder that reads every sequence as if it ended with EOS (appended where it does not).

    Returns hidden states of the input's shape whose last real position holds the appended EOS's
    state; causal attention leaves every earlier position as it was.
    """

    def __init__(self, backbone: nn.Module, eos_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.eos_id = eos_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        b, n = input_ids.shape
        rows = torch.arange(b, device=input_ids.device)
        mask = attention_mask.long()
        last = (mask * torch.arange(1, n + 1, device=mask.device)).argmax(-1)
        needs = input_ids[rows, last] != self.eos_id
        ids = torch.cat([input_ids, input_ids.new_zeros(b, 1)], dim=1)
        ext = torch.cat([mask, mask.new_zeros(b, 1)], dim=1)
        ids[rows[needs], last[needs] + 1] = self.eos_id
        ext[rows[needs], last[needs] + 1] = 1
        position_ids = (ext.cumsum(1) - ext).clamp(min=0)
        out = self.backbone(
            input_ids=ids, attention_mask=ext, position_ids=position_ids, use_cache=False, return_dict=True
        )
        hidden = out.last_hidden_state
        read = hidden[rows, torch.where(needs, last + 1, last)]
        hidden = hidden[:, :n].clone()
        hidden[rows, last] = read
        return SimpleNamespace(hidden_states=(hidden,))


class RewardModel(nn.Module):
    """What TRL's ``get_reward`` needs: ``base_model_prefix``, the backbone under it, and ``score``."""

    base_model_prefix = "model"

    def __init__(self, backbone: nn.Module, score: nn.Linear) -> None:
        super().__init__()
        self.model = backbone
        self.score = score


def biased_head(path: Path) -> nn.Linear:
    from safetensors.torch import load_file

    state = load_file(path)
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head


def lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer's name inside the decoder layers (what rlhfkit's ``lora_config`` targets)."""
    layers = model.model.layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])
    s = settings

    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(s["seed"])
    model_path = prepared["model_path"]
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    if tok.pad_token_id == tok.eos_token_id:
        raise SystemExit("TRL's PPO needs a pad token other than EOS")

    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    policy.generation_config.pad_token_id = tok.pad_token_id
    n_layers = policy.config.num_hidden_layers
    trainable = n_layers if s["trainable_layers"] == 0 else min(s["trainable_layers"], n_layers)
    split = n_layers - trainable
    targets = lora_targets(policy)

    def lora() -> LoraConfig:
        return LoraConfig(
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=0.0,
            target_modules=targets,
            layers_to_transform=list(range(split, n_layers)) if split > 0 else None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    head_file = Path(prepared["trl_reward_dir"]) / "score_head.safetensors"
    value = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    value.score = biased_head(head_file)  # rlhfkit's value head starts from the same normalised reward head
    if s["trl_value"] == "lora":
        value.requires_grad_(False)
        inject_adapter_in_model(lora(), value)
        for name, param in value.named_parameters():
            param.requires_grad = "lora_" in name or name.startswith("score.")
    else:
        value.requires_grad_(True)

    exported = AutoModelForSequenceClassification.from_pretrained(prepared["trl_reward_dir"], dtype=torch.float32)
    reward = RewardModel(EosReadingBackbone(exported.model, tok.eos_token_id), biased_head(head_file))
    reward.requires_grad_(False).eval()

    queries = json.loads(Path(prepared["queries_file"]).read_text())
    dataset = Dataset.from_dict({"input_ids": queries})
    args = PPOConfig(
        output_dir=str(out),
        seed=s["seed"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["num_mini_batches"],
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * s["batch_size"],
        local_rollout_forward_batch_size=s["batch_size"],
        response_length=s["max_new_tokens"],
        temperature=s["temperature"],
        stop_token="eos",
        missing_eos_penalty=None,
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        adam_epsilon=s["adam_epsilon"],
        weight_decay=s["weight_decay"],
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        cliprange=s["clip_range"],
        cliprange_value=s["clip_range_value"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        whiten_rewards=s["whiten_rewards"],
        num_sample_generations=0,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        """Seconds per PPO update (``on_step_end`` follows each update) and that update's logged metrics."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.logs: dict[str, float] = {}

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            self.logs.update(logs or {})

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            now = time.perf_counter()
            row = {
                "step": state.global_step,
                "seconds": now - self.t0,
                "reward": self.logs.get("objective/scores"),
                "kl": self.logs.get("objective/kl"),
                "eos_tokens": self.logs.get("val/num_eos_tokens"),
            }
            print("BENCH " + json.dumps(row), flush=True)
            self.logs = {}
            self.t0 = time.perf_counter()

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        eval_dataset=dataset,
        peft_config=lora(),
        callbacks=[StepTimer()],
    )
    # The same batches as rlhfkit's run, in its order: TRL's collator, no shuffling.
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=s["batch_size"], shuffle=False, collate_fn=trainer.data_collator, drop_last=True)
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(
        "BENCH "
        + json.dumps(
            {
                "trl_args": {
                    "optim": str(getattr(args.optim, "value", args.optim)),
                    "batch_size": args.batch_size,
                    "mini_batch_size": args.mini_batch_size,
                    "num_total_batches": args.num_total_batches,
                    "trainable_params": trainable,
                    "value_model": s["trl_value"],
                    "pad_token_id": tok.pad_token_id,
                }
            }
        ),
        flush=True,
    )
    trainer.train()
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()

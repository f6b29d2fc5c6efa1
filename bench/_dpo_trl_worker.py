"""TRL's side of `dpo_vs_trl.py`: the same DPO training with TRL 1.16.0's ``DPOTrainer``.

    bench/.venv-trl-reward/bin/python bench/_dpo_trl_worker.py SETTINGS.json PREPARED.json OUT_DIR

Runs in the TRL venv and imports nothing from rlhfkit. Trains on the very token ids rlhfkit trains
on (``prompt_ids``, ``chosen_ids`` and ``rejected_ids``, the completions ending in EOS): TRL 1.16's
``DPOTrainer`` always tokenises text columns, so ``_prepare_dataset`` is overridden to take the
already tokenised rows as they are (its collator reads exactly those three columns). Same LoRA, beta,
loss, batch, epochs, learning-rate schedule and clipping. The reference is TRL's default with peft:
the policy with its adapter disabled, run on every step (``precompute_ref_log_probs`` off, its
default; ``--trl-precompute-ref`` turns it on).

Prints (each line prefixed ``BENCH ``) one JSON object per optimizer step, one summary
(``trainer.train()`` seconds, held-out implicit-reward accuracy and DPO loss, computed as rlhfkit
computes them) and one with ``peak_rss_mb``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _bench_common import step_timer
from torch import nn


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that are already ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    torch.manual_seed(s["seed"])
    model_path = prepared["model_path"]
    pairs = json.loads(Path(prepared["pairs_file"]).read_text())
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    layers = model.model.layers
    n_layers = len(layers)
    trainable = n_layers if s["trainable_layers"] == 0 else min(s["trainable_layers"], n_layers)
    split = n_layers - trainable
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})
    peft_config = LoraConfig(
        r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=list(range(split, n_layers)) if split > 0 else None,
        bias="none",
        task_type="CAUSAL_LM",
    )

    train = Dataset.from_list(pairs["train"])
    steps_per_epoch = math.ceil(len(train) / s["batch_size"])
    total = steps_per_epoch * s["epochs"]
    warmup = max(1, round(total * s["warmup_fraction"]))  # rlhfkit's rule
    args = DPOConfig(
        output_dir=str(out),
        seed=s["seed"],
        beta=s["beta"],
        loss_type=["sigmoid"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=s["epochs"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=warmup,
        weight_decay=0.0,
        max_grad_norm=s["max_grad_norm"],
        max_length=None,  # rows are already cut to rlhfkit's max_length
        precompute_ref_log_probs=s["trl_precompute_ref"],
        gradient_checkpointing=s["gradient_checkpointing"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    timer = step_timer()
    trainer = PretokenizedDPOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft_config, callbacks=[timer]
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    for row in timer.rows:
        print("BENCH " + json.dumps(row), flush=True)

    accuracy, loss, margin = evaluate(trainer.model, pairs["eval"], tok.pad_token_id, s["beta"])
    summary = {
        "train_pairs": len(train),
        "eval_pairs": len(pairs["eval"]),
        "epochs": s["epochs"],
        "train_seconds": train_seconds,
        "train_runtime": result.metrics.get("train_runtime"),
        "warmup_steps": warmup,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "eval_margin": margin,
    }
    print("BENCH " + json.dumps({"summary": summary}), flush=True)
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


@torch.no_grad()
def completion_logps(model: nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Summed log-probs of each completion (EOS included) after its prompt."""
    out = []
    for start in range(0, len(rows), 8):
        chunk = rows[start : start + 8]
        seqs = [p + c for p, c in chunk]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in seqs])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, (p, c) in enumerate(chunk):
            out.append(float(token_logps[row, len(p) - 1 : len(p) + len(c) - 1].sum()))
    return torch.tensor(out)


def evaluate(model: nn.Module, rows: list[dict], pad_id: int, beta: float) -> tuple[float, float, float]:
    """Held-out implicit-reward accuracy (a tie counts half), sigmoid DPO loss and mean reward margin."""
    model.eval()
    seqs = [(r["prompt_ids"], c) for r in rows for c in (r["chosen_ids"], r["rejected_ids"])]
    policy = completion_logps(model, seqs, pad_id)
    with model.disable_adapter():
        ref = completion_logps(model, seqs, pad_id)
    rewards = beta * (policy - ref)
    chosen, rejected = rewards[0::2], rewards[1::2]
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return float(wins.mean()), float(-F.logsigmoid(chosen - rejected).mean()), float((chosen - rejected).mean())


if __name__ == "__main__":
    main()

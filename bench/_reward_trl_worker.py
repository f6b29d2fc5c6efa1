"""TRL's side of `reward_vs_trl.py`: the same reward-model training with TRL 1.16.0's ``RewardTrainer``.

    bench/.venv-trl-reward/bin/python bench/_reward_trl_worker.py SETTINGS.json PREPARED.json OUT_DIR

Runs in the TRL venv and imports nothing from rlhfkit. Trains on the very token ids rlhfkit trains
on (``prompt + completion + EOS``, already tokenised, so TRL appends nothing), with the same LoRA,
head initialisation, batch, epochs, learning-rate schedule and clipping. Prints (each line prefixed
``BENCH ``) one JSON object per optimizer step, one summary (``trainer.train()`` seconds, held-out
accuracy against the labels and against the judge's order) and one with ``peak_rss_mb``.

The tokenizer pads with ``<|endoftext|>``: Llama's sequence-classification head reads the last
token that is not the pad id, and SmolLM2 pads with EOS, which would move TRL's read off the EOS
that ends every sequence (rlhfkit reads at the EOS, found by the attention mask).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from _bench_common import step_timer
from torch import nn


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    prepared = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model_path = prepared["model_path"]
    pairs = json.loads(Path(prepared["pairs_file"]).read_text())
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.pad_token = "<|endoftext|>"
    if tok.pad_token_id == tok.eos_token_id:
        raise SystemExit("the benchmark needs a pad token other than EOS")

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    hidden = model.config.hidden_size
    with torch.no_grad():  # rlhfkit's head init (std 1/sqrt(d+1), seeded); Llama's score has no bias
        generator = torch.Generator().manual_seed(s["seed"])
        model.score.weight.copy_(torch.randn((1, hidden), generator=generator) / math.sqrt(hidden + 1))
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
        task_type="SEQ_CLS",  # also trains the score head (modules_to_save)
    )

    columns = ("chosen_ids", "rejected_ids", "margin")
    train = Dataset.from_list([{k: row[k] for k in columns} for row in pairs["train"]])
    steps_per_epoch = math.ceil(len(train) / s["batch_size"])
    total = steps_per_epoch * s["epochs"]
    warmup = max(1, round(total * s["warmup_fraction"]))  # rlhfkit's rule
    args = RewardConfig(
        output_dir=str(out),
        seed=s["seed"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=s["epochs"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=warmup,
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        gradient_checkpointing=s["trl_gradient_checkpointing"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    timer = step_timer()
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft_config, callbacks=[timer]
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    for row in timer.rows:
        print("BENCH " + json.dumps(row), flush=True)

    accuracy, judge_accuracy, loss = evaluate(trainer.model, pairs["eval"], tok.pad_token_id)
    summary = {
        "train_pairs": len(train),
        "eval_pairs": len(pairs["eval"]),
        "epochs": s["epochs"],
        "train_seconds": train_seconds,
        "train_runtime": result.metrics.get("train_runtime"),
        "warmup_steps": warmup,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "eval_accuracy": accuracy,
        "eval_judge_accuracy": judge_accuracy,
        "eval_loss": loss,
    }
    print("BENCH " + json.dumps({"summary": summary}), flush=True)
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, rows: list[dict], pad_id: int, batch: int = 32) -> tuple[float, float | None, float]:
    """Held-out accuracy (a tie counts half), agreement with the judge's order, and the pairwise loss."""
    model.eval()
    scores: list[float] = []
    seqs = [seq for row in rows for seq in (row["chosen_ids"], row["rejected_ids"])]
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
        scores += model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
    chosen, rejected = torch.tensor(scores[0::2]), torch.tensor(scores[1::2])
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    margins = torch.tensor([row["margin"] for row in rows], dtype=torch.float32)
    loss = float(-torch.nn.functional.logsigmoid(chosen - rejected - margins).mean())
    hits = [
        1.0 if (c > r) == (row["judge"] > 0) else 0.5 if c == r else 0.0
        for row, c, r in zip(rows, chosen.tolist(), rejected.tolist(), strict=True)
        if row["judge"]
    ]
    return float(wins.mean()), (sum(hits) / len(hits) if hits else None), loss


if __name__ == "__main__":
    main()

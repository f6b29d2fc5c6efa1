"""rlhfkit's side of `dpo_vs_trl.py` (and its data preparation), in the project's venv.

    .venv/bin/python bench/_dpo_ours_worker.py prepare SETTINGS.json WORK_DIR
    .venv/bin/python bench/_dpo_ours_worker.py train SETTINGS.json PREPARED.json OUT_DIR

``prepare``: the preference data of ``_prepare.preference_data`` (``rlhf generate`` on the last
``rm_prompts`` RealToxicityPrompts prefixes, labelled by the simulated ``nontoxic`` labeler; cached
under ``bench/.cache/prefs-*``, shared with ``reward_vs_trl.py``), split by prompt as ``rlhf dpo``
splits it, as the very token ids rlhfkit trains on: the formatted prompt, then the completion + EOS
(``encode_pairs_with_starts``), written to ``WORK_DIR/pairs.json`` for TRL.

``train``: ``rlhf dpo`` on that file. Prints (each line prefixed ``BENCH ``) one JSON object per
optimizer step (``step``, ``seconds``, ``loss``), one summary (training seconds = the one-off setup,
model load, frozen-layer pass and reference log-probs included, plus the steps; held-out implicit-
reward accuracy and loss) and one with ``peak_rss_mb`` (``ru_maxrss`` of this process).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prepare(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from _prepare import preference_data

    from rlhfkit.data import load_preferences
    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model_path
    from rlhfkit.reward import encode_pairs_with_starts, split_by_prompt

    model_path = resolve_model_path(s["model"])
    load_causal_lm(s["model"])  # the weights in the page cache for both sides
    prefs = preference_data(s)
    records = load_preferences(prefs)
    train_idx, eval_idx = split_by_prompt(records, s["eval_fraction"], s["seed"])
    tok = load_tokenizer(s["model"])
    pairs = encode_pairs_with_starts(tok, records, s["max_length"])

    def row(i: int) -> dict[str, Any]:
        (chosen, c_start), (rejected, r_start) = pairs[i]
        if chosen[:c_start] != rejected[:r_start]:
            raise SystemExit(f"pair {i}: the prompt was cut differently for chosen and rejected; raise --max-length")
        return {"prompt_ids": chosen[:c_start], "chosen_ids": chosen[c_start:], "rejected_ids": rejected[r_start:]}

    (work / "pairs.json").write_text(
        json.dumps({"train": [row(i) for i in train_idx], "eval": [row(i) for i in eval_idx]})
    )
    return {
        "model_path": model_path,
        "preferences": str(prefs),
        "pairs_file": str(work / "pairs.json"),
        "train_pairs": len(train_idx),
        "eval_pairs": len(eval_idx),
        "pad_token_id": tok.pad_token_id,
    }


def train(s: dict[str, Any], prepared: dict[str, Any], out: Path) -> None:
    from rlhfkit.rl.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(
        data=prepared["preferences"],
        out=str(out),
        policy=s["model"],
        beta=s["beta"],
        loss_type="sigmoid",
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        learning_rate=s["learning_rate"],
        warmup_fraction=s["warmup_fraction"],
        weight_decay=0.0,
        max_grad_norm=s["max_grad_norm"],
        max_length=s["max_length"],
        eval_fraction=s["eval_fraction"],
        seed=s["seed"],
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        trainable_layers=s["trainable_layers"],
        gradient_checkpointing=s["gradient_checkpointing"],
        save_every=0,  # the last step's checkpoint only, as TRL saves none
    )
    t0 = time.perf_counter()
    metrics = run_dpo(cfg)
    wall = time.perf_counter() - t0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print("BENCH " + json.dumps({"step": r["step"], "seconds": r["seconds"], "loss": r["loss"]}), flush=True)
    summary = {
        "train_pairs": metrics["train_pairs"],
        "eval_pairs": metrics["eval_pairs"],
        "epochs": s["epochs"],
        "train_seconds": metrics["setup_seconds"] + metrics["train_seconds"],
        "setup_seconds": metrics["setup_seconds"],
        "step_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "eval_margin": metrics["eval_margin"],
    }
    print("BENCH " + json.dumps({"summary": summary}), flush=True)


def main() -> None:
    kind, settings = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    if kind == "prepare":
        work = Path(sys.argv[3])
        work.mkdir(parents=True, exist_ok=True)
        print("BENCH " + json.dumps(prepare(settings, work)), flush=True)
        return
    train(settings, json.loads(Path(sys.argv[3]).read_text()), Path(sys.argv[4]))
    print("BENCH " + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()

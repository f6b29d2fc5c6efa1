"""Inputs of the side-by-side benchmarks, made with rlhfkit in the project's venv and cached.

    .venv/bin/python bench/_prepare.py ppo SETTINGS.json WORK_DIR      # also grpo, rloo: the same inputs
    .venv/bin/python bench/_prepare.py reward SETTINGS.json WORK_DIR

Both print one JSON object (paths and facts) on stdout, prefixed ``BENCH ``; everything else goes
to stderr.

- Preference data (cached under ``bench/.cache/prefs-*``): ``rlhf generate`` on the LAST
  ``rm_prompts`` prompts of ``builtin:realtoxicity`` (the PPO prompts are the first ones), then
  ``rlhf label judge --judge nontoxic`` with the demo's settings (tau 0.05, near-ties < 0.05 left out).
- ``ppo`` (and ``grpo``, ``rloo``, which need the same inputs: ``batch_size`` counts prompts per step):
  a reward model trained with rlhfkit on that data (cached under ``bench/.cache/ppo-rm-*``),
  exported for TRL as a full ``LlamaForSequenceClassification`` directory (the LoRA merged into the
  weights, ``score`` = our head with the reward normalisation PPO applies folded in, the bias beside
  it in ``score_head.safetensors``: Llama's ``score`` has none), checked against rlhfkit's own scoring;
  the PPO prompt file and the prompts' token ids in the exact order rlhfkit's PPO consumes them.
- ``reward``: the train / held-out split of those pairs (by prompt, as ``rlhf reward train`` does) as
  the token ids rlhfkit trains on (``prompt + completion + EOS``), for TRL's ``RewardTrainer``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def preference_data(s: dict[str, Any]) -> Path:
    """Candidates from the default model, labelled by the simulated ``nontoxic`` labeler (cached)."""
    from rlhfkit.cli import GenerateConfig, LabelJudgeConfig, run_generate, run_label_judge
    from rlhfkit.data import load_prompts, prompt_row, write_jsonl

    keyed = {k: s[k] for k in ("model", "rm_prompts", "rm_completions", "rm_max_new_tokens", "seed")}
    folder = CACHE / f"prefs-{_key(keyed)}"
    prefs = folder / "preferences.jsonl"
    if prefs.exists():
        return prefs
    _log(f"making preference data in {folder} (once; cached)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prompts = load_prompts("builtin:realtoxicity")[-s["rm_prompts"] :]
    write_jsonl(tmp / "prompts.jsonl", [prompt_row(p) for p in prompts])
    with contextlib.redirect_stdout(sys.stderr):
        run_generate(
            GenerateConfig(
                prompts=str(tmp / "prompts.jsonl"),
                out=str(tmp / "candidates.jsonl"),
                model=s["model"],
                num_completions=s["rm_completions"],
                max_new_tokens=s["rm_max_new_tokens"],
                seed=s["seed"],
            )
        )
        run_label_judge(
            LabelJudgeConfig(
                candidates=str(tmp / "candidates.jsonl"),
                out=str(tmp / "preferences.jsonl"),
                judge="nontoxic",
                tau=0.05,
                min_gap=0.05,
                seed=s["seed"],
            )
        )
    (tmp / "settings.json").write_text(json.dumps(keyed, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return prefs


def reward_model(s: dict[str, Any], prefs: Path) -> Path:
    """A reward model trained with rlhfkit's defaults (LoRA on the top layers) on ``prefs`` (cached)."""
    from rlhfkit.reward import RewardTrainConfig, train_reward_model

    keyed = {
        "prefs": prefs.parent.name,
        **{k: s[k] for k in ("model", "seed", "rm_epochs", "rm_learning_rate", "rm_eval_fraction")},
        **{k: s[k] for k in ("lora_r", "lora_alpha", "trainable_layers")},
    }
    folder = CACHE / f"ppo-rm-{_key(keyed)}"
    if (folder / "metrics.json").exists():
        return folder
    _log(f"training the PPO benchmark's reward model in {folder} (once; cached)")
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.redirect_stdout(sys.stderr):
        train_reward_model(
            RewardTrainConfig(
                data=str(prefs),
                out=str(folder),
                model=s["model"],
                epochs=s["rm_epochs"],
                learning_rate=s["rm_learning_rate"],
                eval_fraction=s["rm_eval_fraction"],
                lora_r=s["lora_r"],
                lora_alpha=s["lora_alpha"],
                trainable_layers=s["trainable_layers"],
                seed=s["seed"],
            ),
            show_summary=False,
        )
    return folder


def export_reward_for_trl(rm_dir: Path, out: Path, model: str, normalize: bool) -> dict[str, Any]:
    """Our reward model as a full sequence-classification model directory TRL can load.

    ``score.weight`` holds our head (normalised as PPO normalises scores); the bias, which Llama's
    ``score`` lacks, is saved with the weight in ``score_head.safetensors``. The same normalised head
    initialises both sides' value functions (rlhfkit starts its value head from it).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.reward import read_reward_dir

    info = read_reward_dir(rm_dir)
    scale, shift = (1 / info.score_std, info.score_mean) if normalize else (1.0, 0.0)
    weight = (info.head.weight.detach() * scale).contiguous()
    bias = ((info.head.bias.detach() - shift) * scale).contiguous()
    if (out / "score_head.safetensors").exists():
        return {"score_mean": info.score_mean, "score_std": info.score_std}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = load_causal_lm(model)
    if info.kind == "adapter":
        merged = PeftModel.from_pretrained(base, rm_dir / "adapter").merge_and_unload()
    elif info.kind == "probe":
        merged = base
    else:
        raise SystemExit(f"{rm_dir}: a full fine-tuned reward model; the benchmark expects LoRA or a probe")
    config = LlamaConfig.from_dict({**merged.config.to_dict(), "num_labels": 1})
    config.architectures = ["LlamaForSequenceClassification"]
    seqcls = LlamaForSequenceClassification(config)
    seqcls.model.load_state_dict(merged.model.state_dict())
    with torch.no_grad():
        seqcls.score.weight.copy_(weight)
    seqcls.save_pretrained(tmp)
    load_tokenizer(model).save_pretrained(tmp)
    save_file({"weight": weight, "bias": bias}, tmp / "score_head.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"score_mean": info.score_mean, "score_std": info.score_std}


def check_export(rm_dir: Path, trl_dir: Path, model: str, prefs: Path, normalize: bool) -> float:
    """Largest difference between rlhfkit's (normalised) scores and the exported model's, on 8 pairs' texts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.data import load_preferences
    from rlhfkit.models import final_hidden, last_token_index, load_tokenizer, right_pad
    from rlhfkit.reward import encode_pairs, load_reward_model, read_reward_dir, score_sequences

    records = load_preferences(prefs)[:8]
    tok = load_tokenizer(model)
    rows = [seq for pair in encode_pairs(tok, records, 256) for seq in pair]
    ours_model, _, _ = load_reward_model(rm_dir)
    info = read_reward_dir(rm_dir)
    ours = torch.tensor(score_sequences(ours_model, rows, tok.pad_token_id))
    if normalize:
        ours = info.normalise(ours)
    exported = AutoModelForSequenceClassification.from_pretrained(trl_dir, dtype=torch.float32).eval()
    head = load_file(trl_dir / "score_head.safetensors")
    ids, mask = right_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        hidden = final_hidden(exported, ids, mask)
        pooled = hidden[torch.arange(len(rows)), last_token_index(mask)]
        theirs = pooled @ head["weight"].T + head["bias"]
    return float((ours - theirs.squeeze(-1)).abs().max())


def prepare_ppo(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from rlhfkit.data import load_prompts, prompt_row, write_jsonl
    from rlhfkit.generation import encode_prompts
    from rlhfkit.models import load_tokenizer, resolve_model_path
    from rlhfkit.rl.rollout import PromptStream

    model_path = resolve_model_path(s["model"])
    prefs = preference_data(s)
    rm_dir = reward_model(s, prefs)
    trl_reward = rm_dir / "trl-export"
    norm = export_reward_for_trl(rm_dir, trl_reward, s["model"], s["normalize_reward"])
    diff = check_export(rm_dir, trl_reward, s["model"], prefs, s["normalize_reward"])
    if diff > 1e-3:
        raise SystemExit(f"the exported reward model scores differently from rlhfkit's (max diff {diff:.2e})")

    n = s["steps"] * s["batch_size"]
    records = load_prompts("builtin:realtoxicity")[:n]
    if len(records) < n:
        raise SystemExit(f"builtin:realtoxicity has {len(records)} prompts; {n} needed")
    write_jsonl(work / "prompts.jsonl", [prompt_row(r) for r in records])
    tok = load_tokenizer(s["model"])
    queries = [ids[-s["max_prompt_tokens"] :] for ids in encode_prompts(tok, [r.prompt for r in records])]
    stream = PromptStream(len(records), s["seed"])  # rlhfkit's own order: TRL gets the same batches
    order = [i for _ in range(s["steps"]) for i in stream.take(s["batch_size"])]
    (work / "queries.json").write_text(json.dumps([queries[i] for i in order]))
    metrics = json.loads((rm_dir / "metrics.json").read_text())
    return {
        "model_path": model_path,
        "reward_dir": str(rm_dir),
        "trl_reward_dir": str(trl_reward),
        "prompts_file": str(work / "prompts.jsonl"),
        "queries_file": str(work / "queries.json"),
        "preferences": str(prefs),
        "export_max_diff": diff,
        "reward_model": {
            k: metrics.get(k) for k in ("eval_accuracy", "eval_judge_accuracy", "train_pairs", "eval_pairs")
        },
        **norm,
        "eos_token_id": tok.eos_token_id,
    }


def prepare_reward(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from rlhfkit.data import load_preferences
    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model_path
    from rlhfkit.reward import encode_pairs, split_by_prompt

    model_path = resolve_model_path(s["model"])
    load_causal_lm(s["model"])  # the weights in the page cache for both sides (the PPO prepare loads them too)
    prefs = preference_data(s)
    records = load_preferences(prefs)
    train_idx, eval_idx = split_by_prompt(records, s["eval_fraction"], s["seed"])
    tok = load_tokenizer(s["model"])
    pairs = encode_pairs(tok, records, s["max_length"])

    def judge_order(i: int) -> int:
        """+1 / -1 when the judge's own scores order the pair (labels are noisy samples of it), else 0."""
        s_c, s_r = records[i].extra.get("score_chosen"), records[i].extra.get("score_rejected")
        if not isinstance(s_c, (int, float)) or not isinstance(s_r, (int, float)) or s_c == s_r:
            return 0
        return 1 if s_c > s_r else -1

    def rows(idx: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "chosen_ids": pairs[i][0],
                "rejected_ids": pairs[i][1],
                "margin": records[i].margin,
                "judge": judge_order(i),
            }
            for i in idx
        ]

    (work / "pairs.json").write_text(json.dumps({"train": rows(train_idx), "eval": rows(eval_idx)}))
    return {
        "model_path": model_path,
        "preferences": str(prefs),
        "pairs_file": str(work / "pairs.json"),
        "train_pairs": len(train_idx),
        "eval_pairs": len(eval_idx),
        "eos_token_id": tok.eos_token_id,
    }


def main() -> None:
    kind, settings_file, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    settings = json.loads(settings_file.read_text())
    work.mkdir(parents=True, exist_ok=True)
    online = ("ppo", "grpo", "rloo")  # online RL: reward model, its TRL export, prompts in rlhfkit's order
    result = prepare_ppo(settings, work) if kind in online else prepare_reward(settings, work)
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

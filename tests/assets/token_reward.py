"""A reward that tiny-random can learn: the share of response tokens from a favoured set.

The favoured set is the half of the vocabulary whose tiny-random LM-head row points furthest along
one direction, so raising the reward means moving the final hidden state along that direction:
learnable in a few dozen PPO steps, unlike a set of tokens with nothing in common.
"""

from __future__ import annotations

from functools import cache

import torch
from safetensors.torch import load_file

from rlhfkit.models import load_tokenizer, resolve_model_path


@cache
def _favoured() -> tuple[object, frozenset[int]]:
    weights = load_file(f"{resolve_model_path('tiny-random')}/model.safetensors")
    embedding = weights["lm_head.weight"]
    direction = torch.Generator().manual_seed(0)
    u = torch.randn(embedding.shape[1], generator=direction)
    top = torch.topk(embedding @ u, k=embedding.shape[0] // 2).indices
    return load_tokenizer("tiny-random"), frozenset(top.tolist())


def favoured_share(prompts: list[str], completions: list[str]) -> list[float]:
    tokenizer, favoured = _favoured()
    scores = []
    for text in completions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        scores.append(sum(i in favoured for i in ids) / max(1, len(ids)))
    return scores


def unfavoured_share(prompts: list[str], completions: list[str]) -> list[float]:
    """The opposite judge: a monitor that falls exactly as the reward above rises (a hacked reward)."""
    return [1.0 - s for s in favoured_share(prompts, completions)]


def constant(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward with no signal: every completion scores the same."""
    return [0.5 for _ in completions]

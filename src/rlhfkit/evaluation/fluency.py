"""Fluency: how natural the completions read to an independent language model (perplexity).

The scorer is ``gemma3-270m`` (Gemma 3 270M, a base model from another family than the default
policy) when it loads, else the evaluated base model itself; ``metrics.json`` names the one used.

What the scorer sees: the prompt formatted the way the project formats every prompt
(:func:`rlhfkit.models.format_prompt`: the scorer's chat template when its tokenizer has one, the
plain prompt text otherwise), then the completion's tokens. ``gemma3-270m`` is a base model without
a chat template, so it reads plain text: the prompt, then the completion, with a newline between
them when neither side brings its own whitespace (a reply such as "I'm sorry" starts a new line;
a continuation such as " walked in" goes on the prompt's line, as it was written). Only the
completion's tokens are scored: the negative log-likelihood of each completion token given the
prompt and the completion tokens before it, at temperature 1, without gradients.

``fluency_ppl`` of a model is ``exp(total NLL / total tokens)`` over all its non-empty completions
(corpus perplexity): every token counts once, so a few one-token completions with huge per-text
perplexity cannot dominate the number the way a mean of per-completion perplexities lets them.
Per-completion perplexities are kept too (``samples.jsonl``), for reading single cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhfkit.data import Prompt
from rlhfkit.generation import left_pad
from rlhfkit.models import final_hidden, format_prompt, model_device, right_pad

SCORER = "gemma3-270m"
HEAD_TOKENS = 128
"""Completion tokens per LM-head slice: 128 x 262k vocabulary (Gemma) is 134 MB of logits."""


@dataclass
class Nll:
    """Summed negative log-likelihood of one completion's tokens and their count (0 for empty)."""

    total: float
    tokens: int

    @property
    def ppl(self) -> float | None:
        return math.exp(self.total / self.tokens) if self.tokens else None


@dataclass
class Scorer:
    """A loaded scorer model, its name, and why the preferred one was not used (empty if it was)."""

    name: str
    model: nn.Module
    tokenizer: object
    note: str = ""
    load_seconds: float = field(default=0.0)


def corpus_ppl(nlls: Sequence[Nll]) -> float | None:
    """``exp`` of the token-mean NLL over every scored token; None when no completion had tokens."""
    tokens = sum(n.tokens for n in nlls)
    return math.exp(sum(n.total for n in nlls) / tokens) if tokens else None


def _head_nll(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` (N,) from final hidden ``states`` (N, H), the LM head a slice at a time."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    cap = getattr(getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping", None)
    out = []
    for i in range(0, states.shape[0], HEAD_TOKENS):
        logits = head(states[i : i + HEAD_TOKENS]).float()
        if cap:  # Gemma 2 style soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        out.append(-logp.gather(-1, targets[i : i + HEAD_TOKENS, None]).squeeze(-1))
    return torch.cat(out) if out else states.new_zeros(0)


def _encode_queries(tokenizer, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the scorer reads it (see the module doc for the plain-text joint)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = format_prompt(tokenizer, prompt)
        if not chat and text and completion and not text[-1].isspace() and not completion[0].isspace():
            text += "\n"
        out.append(tokenizer(text, add_special_tokens=not chat)["input_ids"])  # a template holds its specials
    return out


@torch.no_grad()
def completion_nll(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[Nll]:
    """Per completion, the summed NLL of its tokens given the formatted prompt (see the module doc).

    Rows are laid out prompt left-padded, completion right-padded, so one forward pass per batch
    scores every completion token; an empty completion gets ``Nll(0.0, 0)``. Everything runs on the
    scorer's device; the sums are taken there in float64 and only the numbers come back.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
    query = [q or [start_id] for q in _encode_queries(tokenizer, prompts, completions)]  # a first token needs context
    answer = [tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for c in completions]
    device = model_device(model)
    results: list[Nll] = []
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        q_ids, q_mask = left_pad([query[i] for i in rows], pad, device=device)
        r_ids, r_mask = (t.to(device) for t in right_pad([answer[i] for i in rows], pad))
        ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
        hidden = final_hidden(model, ids, mask)
        q = q_ids.shape[1]
        keep = r_mask.bool()  # (B, width): which completion positions hold real tokens
        states = hidden[:, q - 1 : -1][keep]  # the state before each completion token predicts it
        nll = _head_nll(model, states, r_ids[keep])
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=device)
        per_row.index_add_(0, keep.nonzero()[:, 0], nll.to(torch.float64))
        counts = keep.sum(1).tolist()
        results.extend(Nll(float(total), int(n)) for total, n in zip(per_row.tolist(), counts, strict=True))
        if on_batch is not None:
            on_batch(len(rows))
    return results

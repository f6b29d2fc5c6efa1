"""The one batched sampler: candidate generation, PPO rollouts and evaluation all call it.

Prompts are left-padded so every row's next token sits in the last column and one KV-cached
``generate`` call serves the whole batch. Sampling is plain temperature / top-p (top-k off), the
same distribution PPO later scores, so rollout and training log-probabilities agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from rlhfkit.console import progress_bar
from rlhfkit.data import Prompt, write_text_atomic
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import format_prompt


@dataclass
class SamplingParams:
    """How responses are drawn; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each formatted prompt (the chat template already holds the special tokens)."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    add_special = not getattr(tokenizer, "chat_template", None)
    return [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Response ids (B, T): everything after the first EOS is ``pad_id``; the EOS itself is kept."""
    config = sampling_config(params, eos_id, pad_id)
    with _without_model_defaults(model):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    return truncate_after_eos(out[:, query_ids.shape[1] :], eos_id, pad_id)


def sampling_config(params: SamplingParams, eos_id: int, pad_id: int):
    """A ``GenerationConfig`` that draws from exactly softmax(logits / temperature) (top-p if asked).

    transformers fills every field left unset (None) from the model's own ``generation_config``
    (a hub model's repetition_penalty, min_p, top_k, ...): PPO would then score responses sampled
    from another distribution. Every field that reshapes the distribution is therefore set here,
    and ``_without_model_defaults`` hides the model's own config during the call.
    """
    from transformers import GenerationConfig

    greedy = params.temperature == 0
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        do_sample=not greedy,
        num_beams=1,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else 0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


@contextmanager
def _without_model_defaults(model: nn.Module) -> Iterator[None]:
    """Swap the model's ``generation_config`` for a blank one, so none of its fields leak in."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(inner, "generation_config", None)
    if saved is None:
        yield
        return
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace every token after the first EOS with padding (EOS and pad may be the same id)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return responses.masked_fill(after_eos, pad_id)


def response_lengths(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per response (EOS included) and whether each one ended with EOS."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    first_eos = torch.where(
        ended, is_eos.long().argmax(-1), torch.full_like(ended, responses.shape[1] - 1, dtype=torch.long)
    )
    return first_eos + 1, ended


@dataclass
class SampledBatch:
    """Responses to a batch of queries, with the bookkeeping every caller needs."""

    responses: torch.Tensor  # (B, T) token ids, padding after the first EOS
    mask: torch.Tensor  # (B, T) 1 on real response tokens, the EOS included
    lengths: torch.Tensor  # tokens per response, EOS included
    ended: torch.Tensor  # whether each response ended with EOS
    texts: list[str]  # decoded without the EOS


def sample_batch(
    model: nn.Module,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    params: SamplingParams,
) -> SampledBatch:
    """Sample one response per (left-padded) query, mask it by length (pad may equal EOS) and decode it."""
    responses = sample_responses(model, query_ids, query_mask, params, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths, ended = response_lengths(responses, tokenizer.eos_token_id)
    mask = (torch.arange(responses.shape[1])[None, :] < lengths[:, None]).long()
    texts = [
        tokenizer.decode(r[: int(n) - int(bool(e))], skip_special_tokens=True)
        for r, n, e in zip(responses, lengths, ended, strict=True)
    ]
    return SampledBatch(responses, mask, lengths, ended, texts)


@dataclass
class GenerationResult:
    completions: list[list[str]]
    """``num_completions`` texts per prompt, in prompt order."""
    tokens: int
    eos_count: int
    seconds: float
    resumed_prompts: int = 0
    """Prompts whose completions came from the journal of a killed run (their tokens are in ``tokens``)."""
    resumed_tokens: int = 0


def generate_completions(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    num_completions: int,
    params: SamplingParams,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
    journal: str | Path | None = None,
    identity: dict[str, Any] | None = None,
) -> GenerationResult:
    """Sample ``num_completions`` per prompt, batching prompts of similar length together.

    ``journal``: a file that gets one line per finished batch (its completions and the random state
    after it), flushed and fsynced. Started again with the same prompts and settings after a kill,
    the run skips the journaled batches and continues from the saved random state, so its result
    equals a straight run's exactly; a torn last line (a kill mid-write) is redone. ``identity``
    (the caller's settings) must match the journal's first line, or the run refuses.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    completions: list[list[str]] = [[] for _ in prompts]
    pad_id = tokenizer.pad_token_id
    tokens = eos_count = 0
    n_batches = math.ceil(len(order) / batch_size)
    identity = {"num_completions": num_completions, **(identity or {})}
    log = BatchJournal(journal, "rlhfkit generate", encoded, params, batch_size, seed, identity)
    for entry in log.done:
        for i, texts in zip(order[entry["batch"] * batch_size :], entry["completions"], strict=False):
            completions[i] = texts
        tokens, eos_count = tokens + entry["tokens"], eos_count + entry["eos"]
    resumed_tokens = tokens
    finished = min(len(log.done) * batch_size, len(prompts))
    progress = progress_bar("generate", disable=not show_progress)
    with log, progress:
        task = progress.add_task("generate", total=len(prompts), completed=finished, info="")
        for b in range(len(log.done), n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            rows = [encoded[i] for i in idx for _ in range(num_completions)]
            ids, mask = left_pad(rows, pad_id)
            batch = sample_batch(model, tokenizer, ids, mask, params)
            tokens += int(batch.lengths.sum())
            eos_count += int(batch.ended.sum())
            for row, text in enumerate(batch.texts):
                completions[idx[row // num_completions]].append(text)
            log.append(
                {
                    "batch": b,
                    "completions": [completions[i] for i in idx],
                    "tokens": int(batch.lengths.sum()),
                    "eos": int(batch.ended.sum()),
                }
            )
            elapsed = time.perf_counter() - start
            progress.update(task, advance=len(idx), info=f"{(tokens - resumed_tokens) / elapsed:.0f} tok/s")
    seconds = time.perf_counter() - start
    return GenerationResult(completions, tokens, eos_count, seconds, finished, resumed_tokens)


# The journal of a long sampling run (`rlhf generate`, `rlhf eval`): a header line with the run's
# settings, then one JSON line per finished batch, each flushed and fsynced before the next batch.


class BatchJournal:
    """Finished batches of a sampling run, on disk as they end, so a killed run continues exactly.

    Opened after the caller has seeded torch: ``done`` holds the batches an earlier run with the
    same header finished (a torn last line is dropped and redone), and the random state is restored
    to the one after the last of them. ``append(entry)`` adds a batch with the random state after
    it. With ``path`` None it keeps nothing (``done`` is empty). The header is the prompts' token
    ids (hashed), the sampling settings, batch size and seed, plus the caller's ``identity``; a
    journal with another header is refused, naming what differs.
    """

    def __init__(
        self,
        path: str | Path | None,
        kind: str,
        encoded: Sequence[Sequence[int]],
        params: SamplingParams,
        batch_size: int,
        seed: int,
        identity: dict[str, Any] | None = None,
    ) -> None:
        header = {
            "journal": kind,
            "prompts": hashlib.sha256(json.dumps(list(encoded)).encode()).hexdigest(),
            "sampling": [params.max_new_tokens, params.temperature, params.top_p],
            "batch_size": batch_size,
            "seed": seed,
            **(identity or {}),
        }
        self.path = Path(path) if path is not None else None
        self.done = _read_journal(self.path, header) if self.path is not None else []
        if self.done:
            rng = self.done[-1]["rng"]
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8))
        self._log = _open_journal(self.path, header, len(self.done)) if self.path is not None else None

    def append(self, entry: dict[str, Any]) -> None:
        """One finished batch (with the random state after it), on disk before this returns."""
        if self._log is None:
            return
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        self._log.write(json.dumps({**entry, "rng": rng}, ensure_ascii=False) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> BatchJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_journal(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The complete batch lines of an earlier run with the same ``header`` (none if no journal)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line: that batch is redone
    if not entries:
        return []
    first, batches = entries[0], entries[1:]
    differ = sorted(k for k in set(first) | set(header) if first.get(k) != header.get(k))
    if differ:
        raise RlhfkitError(
            f"{path}: an unfinished run with other settings ({', '.join(differ)}) left this journal; "
            "run again with the same settings to finish it, or delete the file to start over"
        )
    done = []
    for i, entry in enumerate(batches):
        if entry.get("batch") != i:
            break
        done.append(entry)
    return done


def _open_journal(path: Path, header: dict[str, Any], keep: int) -> IO[str]:
    """The journal rewritten with its header and first ``keep`` batches (dropping a torn line), open to append."""
    kept = path.read_text(encoding="utf-8").split("\n")[1 : keep + 1] if keep else []
    write_text_atomic(path, json.dumps(header) + "\n" + "".join(line + "\n" for line in kept))
    return path.open("a", encoding="utf-8")

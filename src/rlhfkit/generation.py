"""The one batched sampler: candidate generation, PPO rollouts and evaluation all call it.

Prompts are left-padded so every row's next token sits in the last column and one KV-cached
``generate`` call serves the whole batch. Sampling is plain temperature / top-p (top-k off), the
same distribution PPO later scores, so rollout and training log-probabilities agree.

Device: every tensor made here is made on the model's device (``models.model_device``), and queries
built on the CPU are moved there, so the same code samples on a GPU or the CPU.
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
from rlhfkit.models import format_prompt, model_device, model_dtype


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


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask on ``device``, built as lists so each tensor is
    one host-to-device copy (not one per row)."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Response ids (B, T) on the model's device: everything after the first EOS is ``pad_id``; the
    EOS itself is kept. Queries may come from the CPU: they are moved to the model first."""
    device = model_device(model)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
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

    responses: torch.Tensor  # (B, T) token ids, padding after the first EOS (on the model's device)
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
    """Sample one response per (left-padded) query, mask it by length (pad may equal EOS) and decode it.

    The queries may be on the CPU; every tensor returned is on the model's device. Texts are decoded
    from one ``tolist()`` of the batch (one device-to-host copy, not one per token).
    """
    responses = sample_responses(model, query_ids, query_mask, params, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths, ended = response_lengths(responses, tokenizer.eos_token_id)
    mask = (torch.arange(responses.shape[1], device=responses.device)[None, :] < lengths[:, None]).long()
    texts = [
        tokenizer.decode(r[: n - int(e)], skip_special_tokens=True)
        for r, n, e in zip(responses.tolist(), lengths.tolist(), ended.tolist(), strict=True)
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
    log = BatchJournal(journal, "rlhfkit generate", encoded, params, batch_size, seed, identity, model)
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
            ids, mask = left_pad(rows, pad_id, device=model_device(model))
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

    ``model`` (the sampling model) adds its device type and dtype to the header: a GPU draws other
    random numbers than the CPU, and bf16 gives other logits than fp32, so a run resumed on another
    device or dtype could not equal a straight run. On a GPU the random state kept is the CUDA
    generator's too (sampling on the GPU draws from it, not from the CPU's).
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
        model: nn.Module | None = None,
    ) -> None:
        header = {
            "journal": kind,
            "prompts": hashlib.sha256(json.dumps(list(encoded)).encode()).hexdigest(),
            "sampling": [params.max_new_tokens, params.temperature, params.top_p],
            "batch_size": batch_size,
            "seed": seed,
            **(identity or {}),
        }
        self.cuda: torch.device | None = None
        if model is not None:
            device = model_device(model)
            header["device"] = device.type
            header["dtype"] = str(model_dtype(model)).removeprefix("torch.")
            self.cuda = device if device.type == "cuda" else None
        self.path = Path(path) if path is not None else None
        self.done = _read_journal(self.path, header) if self.path is not None else []
        if self.done:
            last = self.done[-1]
            torch.set_rng_state(_unpack_rng(last["rng"]))
            if self.cuda is not None:
                torch.cuda.set_rng_state(_unpack_rng(last["cuda_rng"]), self.cuda)
        self._log = _open_journal(self.path, header, len(self.done)) if self.path is not None else None

    def append(self, entry: dict[str, Any]) -> None:
        """One finished batch (with the random state after it), on disk before this returns."""
        if self._log is None:
            return
        rng = {"rng": _pack_rng(torch.get_rng_state())}
        if self.cuda is not None:
            rng["cuda_rng"] = _pack_rng(torch.cuda.get_rng_state(self.cuda))
        self._log.write(json.dumps({**entry, **rng}, ensure_ascii=False) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> BatchJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pack_rng(state: torch.Tensor) -> str:
    """A generator state (a CPU byte tensor, for the CPU's and CUDA's alike) as base64 text."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def _unpack_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


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

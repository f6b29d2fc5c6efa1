"""One base model, many LoRA adapters, one OpenAI-compatible HTTP server.

Why it is built this way:

- One model object. The base is loaded once; every adapter is loaded onto it as a named peft
  adapter (``load_adapter``), so N tuned variants cost the base plus N small adapters. The base
  itself is the same object, its rows marked ``__base__`` so no adapter touches them.
- One worker thread owns that model. HTTP handlers only validate, tokenize and queue a ``Job``.
- Continuous batching: between two decode steps the worker lets waiting jobs join the running
  batch (oldest first, up to ``max_batch_size`` sequences): their prompts are prefilled in one
  forward and their KV cache is appended to the batch's (left-padded to a common width, positions
  from the mask). Rows leave as soon as they end, so a short request never waits for a long one.
- Mixed adapters: one batch holds rows for any adapter and the base; every forward passes each
  row's adapter name (peft's ``adapter_names``; ``__base__`` for the base), and peft applies each
  LoRA only to its own rows. No adapter is ever "switched on" for the whole model, so one request's
  adapter cannot leak into another's output.
- A decode loop of its own (KV cache, left padding, positions from the mask) rather than
  ``generate``: each request keeps its own sampling settings, seed (a ``torch.Generator`` per
  request, so a seeded request reproduces whatever else shares its batch), ``max_tokens`` and stop
  strings, finishes on its own, and streams its tokens as they come.
- A row leaves the batch, and its KV cache, as soon as it ends or its client goes away, so short
  answers stop costing compute; a plain request checks its connection while it waits.
- Bounded: at most ``max_queue`` requests wait (then 503 with Retry-After), a body is at most
  ``max_body_bytes`` (413 before it is read), a request at most ``max(max_batch_size, MAX_N)`` rows.
- Errors leave in OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: unknown
  model 404, invalid JSON or fields 400, never a traceback (those go to the server log only).

- One device. The model, its adapters and every tensor of the decode loop (ids, masks, positions,
  sampled tokens, each request's generator) live on ``--device`` (a GPU when there is one); logits
  are sampled in float32 whatever ``--dtype`` the weights have, and only the sampled token ids come
  back to the host, once per step. ``/health`` names the device and dtype.

Limits: one process and one device (a GPU when there is one, else the CPU; seeded sampling
reproduces on the same device, not across devices); a joining request's prefill pauses the running
rows for one forward (no chunked prefill); the KV cache is a plain growing one for every model (a
sliding-window model such as Gemma 3 keeps its whole context, as before), and a cache of any other
kind would take new requests only when the running batch ends; ``logprobs``, penalties, tools and
``echo`` are refused with a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request

from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import encode_prompts, left_pad
from rlhfkit.models import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from rlhfkit.web import BodyLimit, unreadable_body

logger = logging.getLogger("rlhfkit.serve")

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows
GRACEFUL_SHUTDOWN_S = 30
MAX_QUEUE = 128  # requests waiting for a batch; past it a 503 with Retry-After
MAX_BODY_BYTES = 2 * 1024 * 1024  # a 128k-token prompt is about 0.5 MB of text
DISCONNECT_POLL_S = 0.25  # how often a waiting (non-streaming) request checks that its client is still there


class APIError(Exception):
    """An error a client caused (or a 5xx it should retry), sent as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# The engine: one model, one worker thread, a queue of jobs


@dataclass(eq=False)
class Job:
    """One HTTP request's generation work; events go back to the handler's event loop."""

    model: str
    adapter: str | None  # None: the base with adapters disabled
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    # Set by the worker when the job joins the running batch:
    generator: torch.Generator | None = field(default=None, repr=False)
    started: float = 0.0  # perf_counter at joining
    open_rows: int = 0  # rows not finished yet

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def emit(self, event: tuple) -> None:
        """Hand an event to the request's event loop (from the worker thread)."""
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client and server are gone
            self.cancelled = True


class _Row:
    """One sequence being decoded: a (prompt, choice) of a job."""

    def __init__(self, engine: ServeEngine, job: Job, index: int, prompt: list[int]) -> None:
        self.engine, self.job, self.index, self.prompt = engine, job, index, prompt
        self.tokens: list[int] = []
        self.generated = 0
        self.sent = 0  # characters already streamed
        self.done = False
        self.watch_text = job.stream or bool(job.stop)

    def push(self, token: int) -> None:
        """Take one sampled token; finish on EOS, a stop string or max_tokens."""
        self.generated += 1
        if token in self.engine.eos_ids:
            self.finish("stop")
            return
        self.tokens.append(token)
        text = self.engine.decode(self.tokens) if self.watch_text else ""
        if self.job.stop:
            cut = min((i for i in (text.find(s) for s in self.job.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finish("stop", text[:cut])
                return
        if len(self.tokens) >= self.job.max_tokens:
            self.finish("length", text if self.watch_text else None)
            return
        if self.job.stream:
            safe = len(text) - _held_back(text, self.job.stop)
            while safe > self.sent and text[safe - 1] == "\ufffd":  # half of a multi-byte character
                safe -= 1
            if safe > self.sent:
                self.job.emit(("delta", self.index, text[self.sent : safe]))
                self.sent = safe

    def finish(self, reason: str, text: str | None = None) -> None:
        self.done = True
        if text is None:
            text = self.engine.decode(self.tokens)
        if self.job.stream and len(text) > self.sent:
            self.job.emit(("delta", self.index, text[self.sent :]))
            self.sent = len(text)
        self.job.emit(("done", self.index, text, reason, self.generated))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string: not streamed yet."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """Longest prompt + completion the model was built for."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return int(limit)


class ServeEngine:
    """The base model with its adapters, and the worker thread that batches requests onto it."""

    def __init__(
        self,
        base: str = DEFAULT_MODEL,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        served_model_name: str = "",
        max_batch_size: int = 16,
        max_model_len: int = 0,
        default_max_tokens: int = 256,
        max_queue: int = MAX_QUEUE,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from rlhfkit.serving.export import load_adapter_source

        # A missing GPU or an unknown dtype fails here, before anything slow loads.
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.base = base
        self.base_name = served_model_name or base
        adapters = dict(adapters or {})
        for name in adapters:
            if not name or name == self.base_name:
                raise RlhfkitError(f"adapter name '{name}' is empty or the base model's own name")
        # Check every adapter before the (slower) model load, so a typo fails at once.
        sources = {name: load_adapter_source(path, base) for name, path in adapters.items()}
        self.base_path = resolve_model_path(base)
        self.tokenizer = load_tokenizer(base)  # used by request handlers (the event loop thread)
        self._decoder = load_tokenizer(base)  # used by the worker: a fast tokenizer is not shared across threads
        model = load_causal_lm(base, self.dtype, self.device)
        self.adapter_dirs = {name: source.adapter_dir for name, source in sources.items()}
        if sources:
            from peft import PeftModel

            names = list(sources)
            try:
                model = PeftModel.from_pretrained(model, sources[names[0]].adapter_dir, adapter_name=names[0])
                for name in names[1:]:
                    model.load_adapter(sources[name].adapter_dir, adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise RlhfkitError(f"adapters do not fit base '{base}': {exc}".splitlines()[0]) from exc
            model.to(self.device).eval()  # peft puts adapters beside their base layers; this makes certain
        self.model = model
        self.context_length = max_model_len or context_length(model, self.tokenizer)
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens
        self.max_queue = max_queue
        # One request may fill a whole batch, and n may always reach MAX_N; more rows than that
        # would make one request a batch of its own of unbounded size.
        self.max_request_rows = max(max_batch_size, MAX_N)
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
        self.eos_ids = {int(e) for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # counters for /health and the tests: prefills (groups of jobs joining the batch)
        self.sequences = 0  # rows that joined
        self.largest_batch = 0  # most rows decoding at once
        self.decode_steps = 0
        self.decoded_rows = 0  # rows fed through decode steps: finished and cancelled rows stop counting
        self.rejected = 0  # requests refused because the queue was full
        self._job_seconds = 1.0  # running mean of a request's time in the batch, for Retry-After

    # -- models ----------------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapter_dirs]

    def resolve(self, name: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base); 404 for anything else."""
        if name == self.base_name:
            return None
        if name in self.adapter_dirs:
            return name
        known = ", ".join(self.model_names)
        raise APIError(
            404, f"The model '{name}' does not exist (served: {known})", param="model", code="model_not_found"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="rlhfkit-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch being decoded, fail what still waits (503), and end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 503 when shutting down or when ``max_queue`` jobs wait."""
        with self._cond:
            if not self.alive:
                raise APIError(503, "The server is shutting down", kind="server_error", code="unavailable")
            if len(self._pending) >= self.max_queue:
                self._pending = deque(j for j in self._pending if not j.cancelled)  # clients that left
            if len(self._pending) >= self.max_queue:
                self.rejected += 1
                # About when a place frees up: the batchfuls ahead of it, at the recent request time.
                ahead = 1 + len(self._pending) // self.max_batch_size
                retry = max(1, math.ceil(self._job_seconds * ahead))
                raise APIError(
                    503,
                    f"The server is busy ({len(self._pending)} requests waiting); retry in {retry} s",
                    kind="server_error",
                    code="overloaded",
                    headers={"Retry-After": str(retry)},
                )
            self._pending.append(job)
            self._cond.notify()

    # -- requests to jobs ------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompts(self.tokenizer, [messages])[0]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        return self._decoder.decode(tokens, skip_special_tokens=True)

    def max_tokens_for(self, prompts: list[list[int]], requested: int | None, param: str) -> int:
        """The request's max_tokens, checked against the context length (400 when it cannot fit)."""
        longest = max(len(p) for p in prompts)
        if requested is None:
            room = self.context_length - longest
            if room < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context_length} tokens; "
                    f"the prompt has {longest} tokens and leaves no room for a completion",
                    param=param,
                    code="context_length_exceeded",
                )
            return min(self.default_max_tokens, room)
        if longest + requested > self.context_length:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens; you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion)",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    # -- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Continuous batching: between two decode steps, waiting jobs join the running batch (as
        long as it has room) and finished rows leave it, so a short request never waits for a long one."""
        batch = _Batch(self.device)
        while True:
            newcomers: list[Job] = []
            try:
                with self._cond:
                    while not self._pending and not batch.rows and not self._stopping:
                        self._cond.wait()
                    leftover: list[Job] = []
                    if self._stopping:  # finish the rows being decoded; nothing new joins
                        leftover = list(self._pending)
                        self._pending.clear()
                    else:
                        newcomers = self._admit(batch)
                for job in leftover:
                    job.emit(("error", 503, "The server is shutting down"))
                if not batch.rows and not newcomers:
                    if self._stopping:
                        break
                    continue
                if newcomers:
                    self._join(batch, newcomers)
                self._step(batch)
            except Exception:  # the worker must outlive any failure, or every later request would hang
                jobs = list(dict.fromkeys([*(row.job for row in batch.rows), *newcomers]))
                logger.exception("generation failed for a batch of %d request(s)", len(jobs))
                for job in jobs:
                    job.emit(("error", 500, "Internal error while generating; the server log has the details"))
                batch = _Batch(self.device)

    def _admit(self, batch: _Batch) -> list[Job]:
        """Waiting jobs, oldest first, that fit beside the running batch (any adapter, the base included).

        First come, first served: a job that does not fit stops the admission, so a large request is
        not overtaken forever by small ones. A cache that cannot be merged (any layer other than a
        plain growing one) takes no one until the running batch ends.
        """
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if batch.rows and not batch.mergeable:
            return []
        rows, admitted = len(batch.rows), []
        while self._pending:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            if rows and rows + job.rows > self.max_batch_size:
                break
            admitted.append(self._pending.popleft())
            rows += job.rows
        return admitted

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, adapters: list[str] | None
    ) -> torch.Tensor:
        """Next-token logits (float32) of every row; ``adapters`` names each row's adapter (peft's mixed batch)."""
        extra = {} if adapters is None else {"adapter_names": adapters}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return out.logits[:, -1, :].float()

    def _adapter_names(self, rows: Sequence[_Row]) -> list[str] | None:
        if not self.adapter_dirs:
            return None
        return [row.job.adapter or _BASE_ROW for row in rows]

    @torch.inference_mode()
    def _join(self, batch: _Batch, jobs: list[Job]) -> None:
        """Prefill the new jobs' prompts in one forward and append their rows (and KV cache) to the batch."""
        from transformers import DynamicCache

        now = time.perf_counter()
        rows = []
        for job in jobs:
            job.started = now
            job.generator = torch.Generator(device=self.device).manual_seed(
                job.seed if job.seed is not None else secrets.randbits(63)
            )
            job.open_rows = job.rows
            rows += [
                _Row(self, job, p * job.n + k, prompt) for p, prompt in enumerate(job.prompts) for k in range(job.n)
            ]
        ids, mask = left_pad([r.prompt for r in rows], self.pad_id, device=self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, position_ids_from_mask(mask), cache, self._adapter_names(rows))
        self.batches += 1
        self.sequences += len(rows)
        batch.add(rows, cache, mask, logits)
        self.largest_batch = max(self.largest_batch, len(batch.rows))

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """Sample one token for every row, let finished (or abandoned) rows leave, decode the rest one step."""
        # Each job samples from its own generator, so a seeded request does not depend on what shares
        # its batch. A job's rows sit next to each other: they join together and leave in order.
        next_tokens = torch.empty(len(batch.rows), dtype=torch.long, device=self.device)
        start = 0
        for job, members in groupby(batch.rows, key=lambda row: row.job):
            end = start + len(list(members))
            assert job.generator is not None
            next_tokens[start:end] = _sample(batch.logits[start:end], job.temperature, job.top_p, job.generator)
            start = end
        for row, token in zip(batch.rows, next_tokens.tolist(), strict=True):  # the step's one copy to the host
            row.push(token)
        keep = []
        for i, row in enumerate(batch.rows):
            if row.done or row.job.cancelled:
                self._row_left(row.job)
            else:
                keep.append(i)
        if len(keep) < len(batch.rows):
            batch.keep(keep)
            next_tokens = next_tokens[torch.tensor(keep, dtype=torch.long, device=self.device)]
        if not batch.rows:
            return
        self.decoded_rows += len(batch.rows)
        self.decode_steps += 1
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        positions = batch.mask.sum(-1, keepdim=True) - 1
        batch.logits = self._forward(
            next_tokens[:, None], batch.mask, positions, batch.cache, self._adapter_names(batch.rows)
        )

    def _row_left(self, job: Job) -> None:
        """Count a row out; when a job's last row leaves, fold its wall time into the Retry-After estimate."""
        job.open_rows -= 1
        if job.open_rows == 0 and not job.cancelled:
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - job.started)

    def _generate(self, jobs: list[Job]) -> None:
        """Decode these jobs to their end as one batch, on the calling thread (tests and benchmarks)."""
        batch = _Batch(self.device)
        self._join(batch, jobs)
        while batch.rows:
            self._step(batch)


_BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch


class _Batch:
    """The running batch: its rows in order, their KV cache, attention mask and next-token logits.

    Rows of different lengths share one left-padded cache: a row that joins is padded (mask 0) to
    the batch's width, or the batch to its width, and positions come from the mask, so padding never
    changes a row's output. Columns that no remaining row uses are cut off when rows leave.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.logits = torch.zeros(0, device=device)

    @property
    def mergeable(self) -> bool:
        """Whether rows can join: every cache layer a plain growing one, which ``_Batch`` knows how to pad."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def add(self, rows: list[_Row], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = rows, cache, mask, logits
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; drop the leading columns none of them uses."""
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.__init__(self.device)
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.mask, self.logits = self.mask[index], self.logits[index]
        first = int(self.mask.any(0).long().argmax())  # the first column some row still attends to
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.mask = self.mask[:, first:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width`` (a mask's padding, or KV the mask hides)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else temperature and nucleus (top-p) sampling with the job's generator."""
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or a denormal that rounds to 0 in the logits' dtype
        return logits.argmax(-1)
    # Shift by the max before dividing: a tiny temperature (1e-30) then gives a near-greedy
    # distribution instead of inf / inf = NaN.
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The OpenAI request bodies


def _whole_number(value: Any) -> Any:
    """2.0 as 2: JSON Schema counts it as an integer, and Python's json writes a float-typed count so."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# int fields that also take 2.0 (never "2" or true); bounds inside, so the schema shows them too
Count = Annotated[int, BeforeValidator(_whole_number)]
PositiveCount = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
ChoiceCount = Annotated[int, Field(ge=1, le=MAX_N), BeforeValidator(_whole_number)]


class _Body(BaseModel):
    # strict: "max_tokens": "5" or true is a client bug to report, not to guess at. Unknown fields
    # (user, metadata, ...) are ignored as OpenAI-compatible servers do. NaN and Infinity (which
    # Python's JSON parser reads) are "not a finite number", not a confusing range error.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: PositiveCount | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: ChoiceCount | None = None
    stop: str | list[str] | None = None
    seed: Count | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return stops

    def unsupported(self) -> list[str]:
        """Fields this server cannot honour, set to something other than their neutral value."""
        return [
            name
            for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0))
            if getattr(self, name) not in (None, neutral)
        ] + (["logit_bias"] if self.logit_bias else [])


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" or part.text is None for part in self.content):
            raise APIError(400, f"messages.{index}.content: only text parts are supported", param="messages")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool | None = None
    top_logprobs: Count | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        extra = ["logprobs"] if self.logprobs else []
        extra += ["top_logprobs"] if self.top_logprobs else []
        extra += ["tools"] if self.tools else []
        extra += ["tool_choice"] if self.tool_choice not in (None, "none", "auto") else []
        if self.response_format and self.response_format.get("type") != "text":
            extra.append("response_format")
        return super().unsupported() + extra


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Count] | list[list[Count]]
    echo: bool | None = None
    logprobs: Count | None = None
    best_of: Count | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        extra = ["echo"] if self.echo else []
        extra += ["logprobs"] if self.logprobs is not None else []
        extra += ["best_of"] if self.best_of not in (None, 1, self.n or 1) else []
        extra += ["suffix"] if self.suffix else []
        return super().unsupported() + extra


# ----------------------------------------------------------------------------------------------
# The response bodies (documented in /openapi.json; the fuzz tests hold every response to them)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    models: list[str]
    device: str
    dtype: str
    queued: int
    batches: int
    sequences: int
    decode_steps: int
    decoded_rows: int


_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "the request is wrong: bad JSON or field (400), unknown model (404)"},
    "5XX": {"model": ErrorBody, "description": "busy (503 with Retry-After), shutting down (503) or a server fault"},
}
_GENERATION = {
    200: {
        "description": 'the completion; with "stream": true, server-sent events ending in "data: [DONE]"',
        "content": {
            "text/event-stream": {
                "schema": {  # one server-sent event: a chunk (or an error) as JSON, the last one [DONE]
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        },
    },
    **_ERRORS,
}


# ----------------------------------------------------------------------------------------------
# The app


def _error_response(error: APIError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def create_app(engine: ServeEngine, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``.

    The app starts the engine's worker on startup and stops it on shutdown (after uvicorn has let
    the requests in flight finish). A body over ``max_body_bytes`` gets a 413 before it is read.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, GRACEFUL_SHUTDOWN_S)

    app = FastAPI(title="rlhfkit serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(
        BodyLimit,
        max_body_bytes=max_body_bytes,
        error_body=lambda status, message: APIError(status, message, code="body_too_large").body(),
    )
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        if first.get("type") == "json_invalid":
            message = f"Request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
            return _error_response(APIError(400, message, code="invalid_json"))
        message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return _error_response(APIError(400, message, param=loc[0] if loc else None, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        unreadable = unreadable_body(exc)
        if unreadable:
            return _error_response(APIError(400, unreadable, code="invalid_json"))
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response is sent, so uvicorn logs the traceback server-side.
        return _error_response(APIError(500, "Internal server error", kind="server_error", code="internal_error"))

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "shutting down"}})
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if engine.alive else "stopping",
            "models": engine.model_names,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "queued": engine.queued,
            "batches": engine.batches,
            "sequences": engine.sequences,
            "decode_steps": engine.decode_steps,
            "decoded_rows": engine.decoded_rows,
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "rlhfkit",
                "root": root,
                "parent": parent,
            }

        data = [card(engine.base_name, engine.base_path, None)]
        data += [card(name, str(path), engine.base_name) for name, path in engine.adapter_dirs.items()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(name: str) -> dict[str, Any]:
        engine.resolve(name)
        return next(m for m in (await list_models())["data"] if m["id"] == name)

    def make_job(body: _Sampling, prompts: list[list[int]], max_tokens: int | None, param: str) -> Job:
        adapter = engine.resolve(body.model)
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{unsupported[0]}: not supported by this server", param=unsupported[0])
        if any(not p for p in prompts):
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        rows = len(prompts) * (body.n or 1)
        if rows > engine.max_request_rows:
            raise APIError(
                400,
                f"{param}: {rows} sequences (prompts x n) in one request; this server takes at most "
                f"{engine.max_request_rows} (send several requests)",
                param=param,
            )
        return Job(
            model=body.model,
            adapter=adapter,
            prompts=prompts,
            n=body.n or 1,
            max_tokens=engine.max_tokens_for(prompts, max_tokens, param),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop_list(),
            seed=None if body.seed is None else body.seed % 2**63,
            stream=bool(body.stream),
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )

    async def results(job: Job, request: Request | None = None) -> AsyncIterator[tuple]:
        """A submitted job's events until every choice is done; a client that leaves cancels the job.

        A stream notices a client that left when its next write fails; a plain request, which
        writes nothing until the end, asks the connection (``request``) every DISCONNECT_POLL_S.
        """
        assert job.events is not None
        remaining = job.rows
        try:
            while remaining:
                if request is None:
                    event = await job.events.get()
                else:
                    try:
                        event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise APIError(400, "The client disconnected", code="client_disconnected") from None
                        continue
                if event[0] == "error":
                    code = "internal_error" if event[1] == 500 else "unavailable"
                    raise APIError(event[1], event[2], kind="server_error", code=code)
                remaining -= event[0] == "done"
                yield event
        finally:
            job.cancelled = remaining > 0  # the worker drops a cancelled job's rows at its next step

    async def collect(job: Job, request: Request) -> tuple[list[str], list[str], int]:
        engine.submit(job)
        texts, reasons, tokens = [""] * job.rows, ["stop"] * job.rows, 0
        async for event in results(job, request):
            if event[0] == "done":
                _, index, text, reason, generated = event
                texts[index], reasons[index] = text, reason
                tokens += generated
        return texts, reasons, tokens

    def stream(
        job: Job, chunk: Any, prompt_tokens: int, include_usage: bool, first: list[dict] | None = None
    ) -> StreamingResponse:
        """Server-sent events: ``chunk(index, text, finish_reason)`` per delta, then ``[DONE]``."""

        async def events() -> AsyncIterator[str]:
            tokens, finished = 0, False
            try:
                for payload in first or []:
                    yield _sse(payload)
                async for event in results(job):
                    if event[0] == "delta":
                        yield _sse(chunk(event[1], event[2], None))
                    else:
                        tokens += event[4]
                        yield _sse(chunk(event[1], None, event[3]))
                finished = True
                if include_usage:
                    yield _sse({**chunk(0, None, None), "choices": [], "usage": _usage(prompt_tokens, tokens)})
            except APIError as exc:  # the status line has gone out: the error travels as an event
                finished = True
                yield _sse(exc.body())
            finally:
                job.cancelled = job.cancelled or not finished  # the client went away mid-stream
            yield _sse("[DONE]")

        engine.submit(job)  # before the 200 goes out, so a shutting-down server answers 503
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_GENERATION)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(body.messages)
        ]
        engine.resolve(body.model)  # 404 before the (cheaper to skip) templating
        try:
            prompt = engine.encode_chat(messages)
        except Exception as exc:  # a chat template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejected them ({exc})", param="messages") from exc
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = make_job(body, [prompt], requested, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": body.model}
        if job.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk(index: int, text: str | None, reason: str | None, delta: dict | None = None) -> dict[str, Any]:
                delta = delta if delta is not None else {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
                return {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}

            # OpenAI opens every choice with its role before any content.
            first = [chunk(i, None, None, {"role": "assistant", "content": ""}) for i in range(job.rows)]
            return stream(job, chunk, len(prompt), include_usage, first)
        texts, reasons, tokens = await collect(job, request)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), tokens)}

    @app.post("/v1/completions", response_model=Completion, responses=_GENERATION)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        engine.resolve(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [engine.encode_text(prompt)]
        elif not prompt:
            raise APIError(400, "prompt: must not be an empty list", param="prompt")
        elif isinstance(prompt[0], str):
            prompts = [engine.encode_text(p) for p in prompt]  # type: ignore[arg-type]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
        if any(t < 0 or t >= engine.vocab_size for p in prompts for t in p):
            raise APIError(400, f"prompt: token ids must lie in [0, {engine.vocab_size})", param="prompt")
        job = make_job(body, prompts, body.max_tokens, "prompt")
        prompt_tokens = sum(len(p) for p in prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if job.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
                return {**base, "choices": [choice], **extra}

            return stream(job, chunk, prompt_tokens, include_usage)
        texts, reasons, tokens = await collect(job, request)
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {**base, "choices": choices, "usage": _usage(prompt_tokens, tokens)}

    return app


# ----------------------------------------------------------------------------------------------
# Running it


def check_port(host: str, port: int) -> None:
    """Fail before loading a model when the address is taken (uvicorn would only log it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RlhfkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc


def run_server(
    engine: ServeEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then lets requests in flight finish (up to 30 s)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(engine, max_body_bytes),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    uvicorn.Server(config).run()

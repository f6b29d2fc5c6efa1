"""Reward model: a causal-LM trunk with a scalar head, trained on preference pairs.

Recipe features and limits:

- Score = ``head(pooled)`` over the final hidden states of ``formatted prompt + completion + EOS``
  (the EOS is always appended, so training text and PPO rollouts end the same way). ``pooling``
  says what is pooled (``reward_scores``, the one function every scorer calls): ``last`` the
  state at the last real token (the EOS), ``mean`` the mean over the completion's tokens and the
  EOS, ``last+mean`` the average of those two vectors. Padding side does not matter: positions
  come from the mask. Directories without ``pooling`` in ``config.yaml`` read ``last``.
- Loss: Bradley-Terry ``-log sigmoid(r_chosen - r_rejected - margin)``; optional dropout on the
  pooled feature while training (``head_dropout``).
- Early stopping (``validation_fraction``): some training prompts are set aside, their loss is
  measured after every epoch and the best epoch's weights are kept (``patience`` stops the run
  after that many epochs without a better one). The reported held-out split is never used for it.
- LoRA (peft) on the top ``trainable_layers`` layers by default; the frozen layers below run once
  per sequence and their output is cached for every epoch (``cache_lower``), which is where the
  speed on a CPU comes from. ``full`` fine-tunes every weight instead (no cache).
- Held-out split by prompt (no prompt in both splits). The run directory keeps the adapter (or the
  full model), ``head.safetensors``, ``config.yaml``, ``metrics.json`` (with ``score_mean`` /
  ``score_std`` of training completions for PPO's reward normalisation), ``metrics.jsonl`` and a
  model card.
- Checkpoints (``checkpoints/step-N``: trainable weights, optimizer, scheduler, the best epoch's
  weights so far, every RNG) every ``save_every`` steps and at each epoch's end; ``resume``
  continues from the last one (the lower-layer cache is rebuilt, the data position follows from the
  step) and reproduces a straight run's ``metrics.jsonl`` and final model.
- N data-parallel processes (``torchrun`` or ``accelerate launch``): each optimizer step's batch of
  pairs is split into contiguous near-equal shares, one per rank, each rank's loss weighted so that
  the all-reduced gradient is that of the whole batch's mean; the logged numbers are whole-batch
  means. The lower-layer cache, the probe and the held-out scores are computed on every rank (the
  same numbers); rank 0 alone writes the directory.
- Active selection: ``pair_uncertainty`` / ``reward_dir_uncertainty`` give ``|P(a > b) - 0.5|`` per
  pair under a reward model, the order ``rlhf label serve --select uncertain`` serves pairs in
  (measured against random order by ``bench/active_labeling.py``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.config import REQUIRED, option, save_config
from rlhfkit.console import print_table, progress_bar
from rlhfkit.data import PreferenceRecord, Prompt, load_preferences, prompt_text, write_text_atomic
from rlhfkit.distributed import (
    all_rng_states,
    global_loss_scale,
    make_accelerator,
    mean_over_ranks,
    rank_seed,
    rank_slice,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import encode_prompts
from rlhfkit.models import (
    CACHE_STORAGES,
    DEFAULT_MODEL,
    DTYPE_HELP,
    build_trunk,
    cache_lower,
    check_not_released,
    final_hidden,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    lower_hidden,
    model_device,
    release_lower,
    resolve_dtype,
    right_pad,
    trainable_state,
    upper_hidden,
)
from rlhfkit.rundir import (
    MetricsLog,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    open_run,
    rng_state,
    save_checkpoint,
    truncate_metrics,
    write_model_card,
)

console = Console(stderr=True)

POOLINGS = ("last", "mean", "last+mean")


@dataclass
class RewardTrainConfig:
    """Options of ``rlhf reward train``."""

    data: str = option(REQUIRED, "Preference dataset (TRL or Vertex form; .jsonl/.json/.parquet).")
    out: str = option(REQUIRED, "Output directory for the reward model.")
    model: str = option(DEFAULT_MODEL, "Backbone: smollm2-135m, tiny-random, a model directory or org/name.")
    epochs: int = option(2, "Passes over the training pairs (0 with a probe head init: the probe alone).")
    batch_size: int = option(16, "Pairs per optimizer step.")
    learning_rate: float = option(3e-4, "Peak learning rate (linear warmup, then linear decay).")
    warmup_fraction: float = option(0.1, "Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    eval_fraction: float = option(0.1, "Fraction of prompts held out for evaluation.")
    seed: int = option(0, "Seed for the split, the head init and the shuffling.")
    full: bool = option(False, "Fine-tune every weight instead of LoRA adapters.")
    lora_r: int = option(16, "LoRA rank (0 = no adapter: train the head alone, a linear probe on the frozen trunk).")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    trainable_layers: int = option(4, "LoRA on the top N transformer layers only (0 = every layer).")
    cache_lower: bool = option(True, "Run the frozen lower layers once and reuse their output each epoch.")
    cache_storage: str = option(
        "disk",
        "Lower-layer cache: disk (exact, a temporary file in --out, not resident), memory (exact, resident), "
        "fp16 or bf16 (resident, half the bytes, lossy).",
    )
    micro_batch: int = option(
        8,
        "Most sequences through the trained layers at once; a step runs in chunks whose gradients add up "
        "(less activation memory). 0 = the whole batch at once.",
    )
    release_lower: bool = option(
        True,
        "Free the frozen lower layers, embeddings and LM head once the lower-layer cache is built (and each "
        "layer's pages while it is built). Exact.",
    )
    max_length: int = option(256, "Longest prompt+completion in tokens; longer ones are cut.")
    dtype: str = option("auto", DTYPE_HELP)
    pooling: str = option(
        "last",
        "What the head reads: last (final state of the last token, the EOS), mean (mean of the "
        "completion's final states, EOS included) or last+mean (the average of the two).",
    )
    head_dropout: float = option(0.0, "Dropout on the pooled feature before the head, while training.")
    validation_fraction: float = option(
        0.0,
        "Fraction of the training prompts set aside to pick the epoch: the weights with the lowest loss "
        "on them are kept (early stopping). 0 = train on every training pair and keep the last epoch.",
    )
    patience: int = option(0, "With --validation-fraction: stop after N epochs without a better loss (0 = never).")
    head_init: str = option(
        "random",
        "random (small random head) or probe: first fit the head alone on the frozen model's pooled features "
        "(a linear probe, L-BFGS with an L2 penalty), then train adapters and head together (LP-FT).",
    )
    probe_l2: float = option(0.1, "L2 penalty of the probe fit by --head-init probe (on the mean Bradley-Terry loss).")
    group_by_prompt: bool = option(
        True,
        "Batch each prompt's pairs together, so a completion shared by several pairs runs once per step "
        "(cheaper epochs; every pair is still seen once per epoch).",
    )
    save_every: int = option(50, "Checkpoint every N optimizer steps (and at every epoch's end).")
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (oldest removed).")
    resume: str = option("", "Continue the run in this directory from its last checkpoint.")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every must be >= 0 and keep_checkpoints >= 1")
        if self.epochs < (0 if self.head_init == "probe" else 1):
            raise ValueError("epochs must be >= 1 (or 0 with head_init probe)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.trainable_layers < 0:
            raise ValueError("trainable_layers must be >= 0")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.patience < 0:
            raise ValueError("patience must be >= 0")
        if self.head_init not in ("random", "probe"):
            raise ValueError(f"head_init must be random or probe, got {self.head_init!r}")
        if self.micro_batch < 0 or self.micro_batch == 1:
            raise ValueError(f"micro_batch must be 0 (off) or >= 2 (a pair's two sequences), got {self.micro_batch}")
        if self.cache_storage not in CACHE_STORAGES:
            raise ValueError(f"cache_storage must be one of {', '.join(CACHE_STORAGES)}, got {self.cache_storage!r}")


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)``."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked right; a tie counts half."""
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return float(wins.mean())


def join_for_reward(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int, max_length: int
) -> list[int]:
    """``prompt + completion + EOS``, cut to ``max_length`` (completion first, then prompt from the left)."""
    return join_with_start(prompt_ids, completion_ids, eos_id, max_length)[0]


def join_with_start(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int, max_length: int
) -> tuple[list[int], int]:
    """``join_for_reward`` and the index of the completion's first token (of the EOS if it is empty)."""
    completion = [t for t in completion_ids if t != eos_id]
    room = max_length - 1
    prompt = list(prompt_ids)
    if len(prompt) > room // 2 and len(prompt) + len(completion) > room:
        prompt = prompt[-max(room // 2, room - len(completion)) :]
    completion = completion[: room - len(prompt)]
    return [*prompt, *completion, eos_id], len(prompt)


def pool_hidden(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: torch.Tensor | None = None,
    pooling: str = "last",
) -> torch.Tensor:
    """The (B, d) feature the reward head reads from final hidden states (B, T, d).

    ``completion_start``: per row, the column of the completion's first token (in PPO, the padded
    query width for every row); the completion runs from there to the last real token (the EOS)
    and positions with mask 0 inside it are skipped. None = the whole sequence counts as completion.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    if pooling == "last":
        return last
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
    span = attention_mask.to(hidden.dtype)
    if completion_start is not None:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        start = torch.as_tensor(completion_start, device=hidden.device).reshape(-1, 1)
        span = span * (positions[None, :] >= start).to(hidden.dtype)
    mean = (hidden * span[..., None]).sum(1) / span.sum(1, keepdim=True).clamp(min=1.0)
    return mean if pooling == "mean" else (last + mean) / 2


def reward_scores(
    head: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: torch.Tensor | None = None,
    pooling: str = "last",
) -> torch.Tensor:
    """Raw reward scores (B,) from final hidden states: ``head(pool_hidden(...))``.

    Every scorer goes through this function: training, ``rlhf reward score``/``eval`` and PPO's
    shared-backbone path, so they cannot drift apart.
    """
    return head(pool_hidden(hidden, attention_mask, completion_start, pooling)).squeeze(-1)


class RewardModel(nn.Module):
    """A trunk (plain or peft-wrapped causal LM) and a scalar head over pooled final states.

    ``split`` is the index of the first layer that can change during training: the output of the
    layers below it can be computed once (``lower``) and reused (``forward(lower=...)``).
    ``head_dropout`` applies to the pooled feature in training mode only. The head stays fp32 under
    a bf16 or fp16 trunk: the final states are cast to its dtype.
    """

    def __init__(
        self, trunk: nn.Module, head: nn.Linear, split: int = 0, pooling: str = "last", head_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
        self.trunk = trunk
        self.head = head
        self.split = split
        self.pooling = pooling
        self.dropout = nn.Dropout(head_dropout)

    def _pool(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None
    ) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            head = nn.Sequential(self.dropout, self.head)
            return reward_scores(head, hidden, attention_mask, completion_start, self.pooling)
        return reward_scores(self.head, hidden, attention_mask, completion_start, self.pooling)

    def _final(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, lower: torch.Tensor | None
    ) -> torch.Tensor:
        """Final hidden states in the head's dtype, from the ids or from the cached ``lower`` states."""
        if lower is not None:
            hidden = upper_hidden(self.trunk, lower, attention_mask, self.split)
        else:
            check_not_released(self.trunk, "reward scoring from token ids")
            hidden = final_hidden(self.trunk, input_ids, attention_mask)
        return hidden.to(self.head.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        completion_start: torch.Tensor | None = None,
        lower: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (B,); with ``lower`` (the output of the layers below ``split``) the ids are not read.
        Training calls this, through the accelerator's wrapper, so data parallelism sees the forward."""
        return self._pool(self._final(input_ids, attention_mask, lower), attention_mask, completion_start)

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The pooled feature the head reads (no dropout)."""
        return pool_hidden(self._final(input_ids, attention_mask, None), attention_mask, completion_start, self.pooling)

    def features_from_lower(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        return pool_hidden(self._final(None, attention_mask, hidden), attention_mask, completion_start, self.pooling)

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return lower_hidden(self.trunk, input_ids, attention_mask, self.split)

    def score_from_lower(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(None, attention_mask, completion_start, lower=hidden)


def new_head(hidden_size: int, seed: int) -> nn.Linear:
    """Small random init (std 1/sqrt(d+1)), as in Stiennon et al., so initial scores are near 0."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(hidden_size + 1))
        head.bias.zero_()
    return head


# ----------------------------------------------------------------------------------------------
# Loading and scoring


@dataclass
class RewardModelDir:
    """What a reward-model directory holds, read from its ``config.yaml`` and checked on disk.

    ``kind`` is ``adapter`` (LoRA on ``base``), ``probe`` (the head alone on ``base``) or ``full``
    (a whole fine-tuned model under ``model/``).
    """

    folder: Path
    base: str
    kind: str
    metrics: dict
    head: nn.Linear
    pooling: str = "last"
    max_length: int = 256
    """The longest prompt+completion it was trained on (``config.yaml``); scoring cuts at the same length."""

    @property
    def score_mean(self) -> float:
        return float(self.metrics.get("score_mean", 0.0))

    @property
    def score_std(self) -> float:
        return float(self.metrics.get("score_std", 1.0)) or 1.0

    def normalise(self, score: float | torch.Tensor) -> float | torch.Tensor:
        """Scores in units of the training completions' spread, as PPO consumes them."""
        return (score - self.score_mean) / self.score_std

    def scores(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None
    ) -> torch.Tensor:
        """Raw scores from final hidden states (``reward_scores`` with this model's head and pooling)."""
        return reward_scores(self.head, hidden, attention_mask, completion_start, self.pooling)


def read_reward_dir(path: str | Path) -> RewardModelDir:
    """Check a directory written by ``rlhf reward train`` and say what it holds."""
    import yaml

    folder = Path(path)
    if not (folder / "config.yaml").exists():
        raise RlhfkitError(f"{folder}: not a reward model directory (no config.yaml)")
    cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    kind = "full" if cfg.get("full") else "probe" if cfg.get("lora_r") == 0 else "adapter"
    needed = {"full": "model/config.json", "adapter": "adapter/adapter_config.json", "probe": "head.safetensors"}
    for name in ("head.safetensors", "metrics.json", needed[kind]):
        if not (folder / name).exists():
            raise RlhfkitError(f"{folder}: incomplete reward model, {name} missing (was training interrupted?)")
    head_state = load_file(folder / "head.safetensors")
    head = nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    metrics = json.loads((folder / "metrics.json").read_text())
    pooling = str(cfg.get("pooling") or "last")
    if pooling not in POOLINGS:
        raise RlhfkitError(f"{folder}/config.yaml: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    max_length = int(cfg.get("max_length") or 256)
    return RewardModelDir(folder, str(cfg.get("model", "")), kind, metrics, head, pooling, max_length)


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[RewardModel, object, dict]:
    """A trained reward model directory as (model on ``device``, tokenizer, metrics)."""
    info = read_reward_dir(path)
    if info.kind == "full":
        trunk = load_causal_lm(str(info.folder / "model"))
        tokenizer = load_tokenizer(str(info.folder / "model"))
    elif info.kind == "adapter":
        from peft import PeftModel

        trunk = PeftModel.from_pretrained(load_causal_lm(info.base), info.folder / "adapter", adapter_name="reward")
        tokenizer = load_tokenizer(info.base)
    else:
        trunk = load_causal_lm(info.base)
        tokenizer = load_tokenizer(info.base)
    model = RewardModel(trunk, info.head, pooling=info.pooling).to(device).eval()
    return model, tokenizer, info.metrics


Encoded = tuple[list[int], int]
"""Token ids of ``prompt + completion + EOS`` and the index where the completion starts."""


def encode_pairs_with_starts(
    tokenizer, records: Sequence[PreferenceRecord], max_length: int
) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) per pair as (ids, completion start); each prompt is tokenised once."""
    prompt_cache: dict[str, list[int]] = {}
    eos = tokenizer.eos_token_id
    out = []
    for rec in records:
        key = json.dumps(rec.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompts(tokenizer, [rec.prompt])[0]
        p = prompt_cache[key]
        chosen = tokenizer(rec.chosen, add_special_tokens=False)["input_ids"]
        rejected = tokenizer(rec.rejected, add_special_tokens=False)["input_ids"]
        out.append((join_with_start(p, chosen, eos, max_length), join_with_start(p, rejected, eos, max_length)))
    return out


def encode_pairs(tokenizer, records: Sequence[PreferenceRecord], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) per pair, each formatted prompt tokenised once per prompt."""
    return [(c[0], r[0]) for c, r in encode_pairs_with_starts(tokenizer, records, max_length)]


@torch.no_grad()
def score_sequences(
    model: RewardModel,
    rows: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    starts: Sequence[int] | None = None,
) -> list[float]:
    """Raw scores of token sequences, batched by length; ``starts`` = where each completion begins
    (needed by the mean poolings; None = the whole sequence)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = right_pad([rows[i] for i in idx], pad_id)
        begin = torch.tensor([starts[i] for i in idx], device=device) if starts is not None else None
        for i, s in zip(idx, model(ids.to(device), mask.to(device), begin).float().tolist(), strict=True):
            scores[i] = s
    return scores


def score_texts(
    model: RewardModel,
    tokenizer,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
) -> list[float]:
    """Raw reward-model scores for (prompt, completion) pairs."""
    eos = tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts)
    joined = [
        join_with_start(p, tokenizer(c, add_special_tokens=False)["input_ids"], eos, max_length)
        for p, c in zip(prompt_ids, completions, strict=True)
    ]
    rows, starts = [r for r, _ in joined], [s for _, s in joined]
    return score_sequences(model, rows, tokenizer.pad_token_id, batch_size, starts)


def preference_uncertainty(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """``|P(first > second) - 0.5|`` per pair of reward scores, ``P = sigmoid(r_first - r_second)``
    (Bradley-Terry): 0 for a coin flip, near 0.5 for a sure call. Computed as ``|tanh(d / 2)| / 2``,
    the same number, which cannot overflow."""
    return [abs(math.tanh((a - b) / 2)) / 2 for a, b in zip(first, second, strict=True)]


def pair_uncertainty(
    model: RewardModel,
    tokenizer,
    pairs: Sequence[tuple[Prompt, str, str]],
    max_length: int = 256,
    batch_size: int = 16,
) -> list[float]:
    """How unsure the reward model is about each (prompt, first, second): ``preference_uncertainty``
    of their scores (``score_texts``), every distinct (prompt, completion) scored once. Active
    selection (``rlhf label serve --select uncertain``) asks people about the smallest values first."""
    index: dict[tuple[str, str], int] = {}
    prompts: list[Prompt] = []
    texts: list[str] = []
    refs: list[tuple[int, int]] = []
    for prompt, first, second in pairs:
        key = json.dumps(prompt, sort_keys=True)
        ref = []
        for text in (first, second):
            if (key, text) not in index:
                index[key, text] = len(texts)
                prompts.append(prompt)
                texts.append(text)
            ref.append(index[key, text])
        refs.append((ref[0], ref[1]))
    scores = score_texts(model, tokenizer, prompts, texts, max_length, batch_size) if texts else []
    return preference_uncertainty([scores[i] for i, _ in refs], [scores[j] for _, j in refs])


def reward_dir_uncertainty(
    path: str | Path,
    pairs: Sequence[tuple[Prompt, str, str]],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> list[float]:
    """``pair_uncertainty`` under the reward model in directory ``path`` (as ``rlhf reward train``
    wrote it), cut at the ``max_length`` it was trained with."""
    info = read_reward_dir(path)
    model, tokenizer, _ = load_reward_model(path, device)
    return pair_uncertainty(model, tokenizer, pairs, info.max_length, batch_size)


def evaluate_pairs(
    model: RewardModel, tokenizer, records: Sequence[PreferenceRecord], max_length: int = 256
) -> dict[str, float]:
    """Accuracy, loss and mean margin of a reward model on preference pairs."""
    pairs = encode_pairs_with_starts(tokenizer, records, max_length)
    flat = [seq for pair in pairs for seq in pair]
    rows, starts = [r for r, _ in flat], [s for _, s in flat]
    scores = torch.tensor(score_sequences(model, rows, tokenizer.pad_token_id, starts=starts))
    return _pair_metrics(scores[0::2], scores[1::2], torch.tensor([r.margin for r in records]))


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": pairwise_accuracy(chosen, rejected),
        "loss": float(bradley_terry_loss(chosen, rejected, margin)),
        "mean_margin": float((chosen - rejected).mean()),
    }


def judge_agreement(records: Sequence[PreferenceRecord], chosen: torch.Tensor, rejected: torch.Tensor) -> float | None:
    """How often the reward model orders a pair as the judge's own scores do (labels from
    ``rlhf label judge`` are noisy samples of that order). None when the data has no judge scores.
    """
    hits = []
    for rec, c, r in zip(records, chosen.tolist(), rejected.tolist(), strict=True):
        s_c, s_r = rec.extra.get("score_chosen"), rec.extra.get("score_rejected")
        if isinstance(s_c, (int, float)) and isinstance(s_r, (int, float)) and s_c != s_r:
            hits.append(1.0 if (c > r) == (s_c > s_r) else 0.5 if c == r else 0.0)
    return sum(hits) / len(hits) if hits else None


# ----------------------------------------------------------------------------------------------
# Training


def prompt_key(record: PreferenceRecord) -> str:
    """One string per distinct prompt: what keeps a prompt's pairs together (splits, batches, chunks)."""
    return json.dumps(prompt_text(record.prompt))


def split_by_prompt(
    records: Sequence[PreferenceRecord], eval_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Train and eval indices with every prompt's pairs on one side only."""
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(prompt_key(rec), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(keys) > 1:
        n_eval = 1
    eval_idx = sorted(i for k in keys[:n_eval] for i in groups[k])
    train_idx = sorted(i for k in keys[n_eval:] for i in groups[k])
    return train_idx, eval_idx


def dedupe_sequences(
    pairs: Sequence[tuple[Encoded, Encoded]],
) -> tuple[list[list[int]], list[int], list[tuple[int, int]]]:
    """Unique sequences, their completion starts and, per pair, the indices of its chosen and
    rejected sequence. With K completions per prompt every completion appears in K-1 pairs: it is run once.
    """
    index: dict[tuple[tuple[int, ...], int], int] = {}
    seqs: list[list[int]] = []
    starts: list[int] = []
    refs = []
    for pair in pairs:
        ref = []
        for seq, start in pair:
            key = (tuple(seq), start)
            if key not in index:
                index[key] = len(seqs)
                seqs.append(list(seq))
                starts.append(start)
            ref.append(index[key])
        refs.append((ref[0], ref[1]))
    return seqs, starts, refs


def _pad_hidden(hiddens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(h.shape[0] for h in hiddens)
    out = hiddens[0].new_zeros((len(hiddens), width, hiddens[0].shape[-1]))
    mask = torch.zeros((len(hiddens), width), dtype=torch.long, device=out.device)
    for i, h in enumerate(hiddens):
        out[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = 1
    return out, mask


class _Scorer:
    """Scores (flattened) sequences by index, from the lower-layer cache when there is one.

    ``model`` is the unwrapped reward model (scoring without gradients); the training step passes
    the accelerator's wrapper of it to ``__call__``, so that data parallelism sees its forward.
    """

    def __init__(
        self,
        model: RewardModel,
        seqs: list[list[int]],
        starts: list[int],
        pad_id: int,
        cache: Sequence[torch.Tensor] | None,
        device: torch.device | str = "cpu",
    ):
        self.model, self.seqs, self.starts, self.pad_id, self.cache = model, seqs, starts, pad_id, cache
        self.device = torch.device(device)

    def inputs(self, idx: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(ids, mask, completion starts, cached lower states)`` of sequences ``idx`` on the device;
        the ids are None when the cache stands in for them."""
        begin = torch.tensor([self.starts[i] for i in idx], device=self.device)
        if self.cache is not None:
            hidden, mask = _pad_hidden([self.cache[i] for i in idx])
            return None, mask.to(self.device), begin, hidden.to(self.device)
        ids, mask = right_pad([self.seqs[i] for i in idx], self.pad_id)
        return ids.to(self.device), mask.to(self.device), begin, None

    def __call__(self, idx: Sequence[int], model: nn.Module | None = None) -> torch.Tensor:
        ids, mask, begin, lower = self.inputs(idx)
        return (model if model is not None else self.model)(ids, mask, begin, lower=lower)

    @torch.no_grad()
    def features(self, idx: Sequence[int], batch_size: int = 32) -> torch.Tensor:
        """Pooled features (len(idx), d), each unique sequence run once."""
        order = sorted(set(idx), key=lambda i: len(self.seqs[i]))
        out: dict[int, torch.Tensor] = {}
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            ids, mask, begin, lower = self.inputs(chunk)
            if lower is not None:
                feats = self.model.features_from_lower(lower, mask, begin)
            else:
                feats = self.model.features(ids, mask, begin)
            out.update(zip(chunk, feats, strict=True))
        return torch.stack([out[i] for i in idx])

    @torch.no_grad()
    def all(self, idx: Sequence[int], batch_size: int = 32) -> torch.Tensor:
        order = sorted(set(idx), key=lambda i: len(self.seqs[i]))  # each unique sequence once
        out = {}
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            out.update(zip(chunk, self(chunk).tolist(), strict=True))
        return torch.tensor([out[i] for i in idx], device=self.device)


def micro_batches(
    pair_idx: Sequence[int],
    pair_refs: Sequence[tuple[int, int]],
    limit: int,
    group_of: Sequence[str] | None = None,
) -> list[list[int]]:
    """``pair_idx`` cut, in order, into chunks whose pairs hold at most ``limit`` unique sequences (0 = one
    chunk). ``group_of``: a key per pair (its prompt); consecutive pairs with one key go into a chunk
    whole when they fit, so a completion shared by several pairs of a prompt still runs once. A group
    larger than ``limit`` is cut pair by pair."""
    if limit <= 0:
        return [list(pair_idx)]
    runs: list[list[int]] = []
    for n, i in enumerate(pair_idx):
        same = n > 0 and group_of is not None and group_of[i] == group_of[pair_idx[n - 1]]
        if same:
            runs[-1].append(i)
        else:
            runs.append([i])
    chunks: list[list[int]] = []
    seen: set[int] = set()
    for run in runs:
        seqs = {s for i in run for s in pair_refs[i]}
        if chunks and len(seen | seqs) <= limit:
            chunks[-1].extend(run)
            seen |= seqs
            continue
        if len(seqs) <= limit:
            chunks.append(list(run))
            seen = seqs
            continue
        for i in run:  # too large for one chunk: pair by pair
            new = set(pair_refs[i]) - seen
            if chunks and len(seen) + len(new) <= limit:
                chunks[-1].append(i)
                seen |= new
            else:
                chunks.append([i])
                seen = set(pair_refs[i])
    return chunks


class PromptGroupedBatches:
    """Batches of pair indices, epoch by epoch: prompts in a new order each epoch (seeded by seed and
    epoch), each prompt's pairs side by side, cut every ``batch_size`` pairs. With K completions per
    prompt a completion is in up to K-1 pairs; grouped, it is mostly run once per epoch instead of
    once per pair. ``by_prompt=False``: every pair is its own group (a plain shuffle).

    ``whole_groups``: cut only between prompts where one can (at the prompt boundary nearest each
    multiple of ``batch_size``), so all pairs of a prompt, e.g. the K(K-1)/2 pairs of a ranking, are
    in one batch, as InstructGPT trained on rankings. The number of batches stays
    ``ceil(pairs / batch_size)``; their sizes vary a little, and a prompt with more pairs than a
    batch holds is still split.

    The order is a function of (seed, epoch) alone, so a resumed run finds its data position from
    the step: ``from_step``.
    """

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        pair_idx: Sequence[int],
        batch_size: int,
        seed: int,
        by_prompt: bool = True,
        whole_groups: bool = False,
    ):
        groups: dict[str, list[int]] = {}
        for i in pair_idx:
            key = prompt_key(records[i]) if by_prompt else str(i)
            groups.setdefault(key, []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        self.n_pairs = len(pair_idx)
        self.batch_size = batch_size
        self.seed = seed
        self.whole_groups = whole_groups and by_prompt

    def __len__(self) -> int:
        return math.ceil(self.n_pairs / self.batch_size)

    def smallest(self, epochs: int) -> int:
        """Pairs in the smallest batch of the first ``epochs`` epochs (without ``whole_groups``, an
        epoch's last; every other one has ``batch_size``)."""
        if not self.whole_groups:
            return self.n_pairs - (len(self) - 1) * self.batch_size
        return min(len(batch) for epoch in range(max(1, epochs)) for batch in self.epoch_batches(epoch))

    def _cuts(self, group_ends: list[int]) -> list[int]:
        """Batch boundaries: the group end nearest each multiple of ``batch_size``, leaving every batch
        at least one pair (inside a group only where no group end fits)."""
        n, total = len(self), self.n_pairs
        cuts = [0]
        for k in range(1, n):
            low, high = cuts[-1] + 1, total - (n - k)
            fits = [end for end in group_ends if low <= end <= high]
            target = k * self.batch_size
            cuts.append(min(fits, key=lambda end: (abs(end - target), end)) if fits else min(max(target, low), high))
        return [*cuts, total]

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[list[int]]:
        """Epoch ``epoch``'s batches, from its ``skip``-th on."""
        rng = random.Random(f"{self.seed}-{epoch}")
        order = list(self.groups)
        rng.shuffle(order)
        flat = [i for group in order for i in rng.sample(group, len(group))]
        if self.whole_groups:
            cuts = self._cuts(list(itertools.accumulate(len(group) for group in order)))
        else:
            cuts = [*range(0, len(flat), self.batch_size), len(flat)]
        for start, end in list(itertools.pairwise(cuts))[skip:]:
            yield flat[start:end]

    def from_step(self, step: int) -> Iterator[tuple[int, list[int]]]:
        """``(epoch, batch)`` from optimizer step ``step`` on, without end."""
        epoch, skip = divmod(step, len(self))
        while True:
            for batch in self.epoch_batches(epoch, skip):
                yield epoch, batch
            epoch, skip = epoch + 1, 0


def fit_linear_probe(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, l2: float, max_iter: int = 500
) -> torch.Tensor:
    """Weights w (d,) minimising ``mean(-log sigmoid(w.(f_chosen - f_rejected) - margin)) + l2 |w|^2``
    (L-BFGS; the objective is convex, so the result does not depend on a seed). A bias cancels out."""
    diff = (chosen - rejected).detach().double()
    m = margin.detach().double() if margin is not None else torch.zeros(len(diff), dtype=torch.float64)
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -F.logsigmoid(diff @ w - m).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach().float()


def split_for_validation(
    records: Sequence[PreferenceRecord], train_idx: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Training indices split by prompt into (fit, validation) for early stopping; fraction 0 = no split."""
    if fraction <= 0:
        return list(train_idx), []
    fit, val = split_by_prompt([records[i] for i in train_idx], fraction, seed + 1)
    if not fit:
        return list(train_idx), []
    return [train_idx[i] for i in fit], [train_idx[i] for i in val]


def _trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@torch.no_grad()
def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in model.named_parameters():
        if k in state:
            v.copy_(state[k])


def train_reward_model(cfg: RewardTrainConfig, show_summary: bool = True) -> dict:
    """Train (or, with ``cfg.resume``, continue), evaluate and save a reward model, this process on its
    share of every batch; returns its metrics."""
    from accelerate.utils import set_seed

    if cfg.resume:
        cfg = open_run(cfg, required=(), may_change=(), write=False)  # written below, by rank 0
    elif not (cfg.data and cfg.out):
        raise RlhfkitError("missing required option --data or --out (or --resume RUN_DIR)")
    # --full: an untied LM head trains but the score never reads it; data parallelism must not wait
    # for its gradient.
    accelerator = make_accelerator(find_unused_parameters=cfg.full)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    records = load_preferences(cfg.data)
    train_idx, eval_idx = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    if not train_idx:
        raise RlhfkitError(f"{cfg.data}: no training pairs left after holding out {cfg.eval_fraction:.0%}")
    fit_idx, val_idx = split_for_validation(records, train_idx, cfg.validation_fraction, cfg.seed)
    # Pairs from rankings (``rlhf label serve --mode rank``) are batched whole per prompt, as InstructGPT did.
    rankings = any("ranking_id" in records[i].extra or "ranking_ids" in records[i].extra for i in fit_idx)
    batches = PromptGroupedBatches(
        records, fit_idx, cfg.batch_size, cfg.seed, by_prompt=cfg.group_by_prompt, whole_groups=rankings
    )
    # Every rank takes a share of each batch, so the smallest needs a pair per rank.
    smallest = batches.smallest(cfg.epochs)
    rank_slice(smallest, rank, world, f"--batch-size {cfg.batch_size} (smallest batch: {smallest} pairs)")
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.seed)
    started = time.perf_counter()

    tokenizer = load_tokenizer(cfg.model)
    base = load_causal_lm(cfg.model, resolve_dtype(cfg.dtype, device))
    trunk, split = build_trunk(base, cfg.full, cfg.lora_r, cfg.lora_alpha, cfg.trainable_layers)
    head = new_head(base.config.hidden_size, cfg.seed)
    model = RewardModel(trunk, head, split, pooling=cfg.pooling, head_dropout=cfg.head_dropout)
    model.to(device)  # the head keeps its fp32

    pairs = encode_pairs_with_starts(tokenizer, records, cfg.max_length)
    seqs, starts, pair_refs = dedupe_sequences(pairs)

    def flat(pair_idx: Sequence[int]) -> list[int]:  # chosen, rejected, chosen, rejected, ...
        return [seq for i in pair_idx for seq in pair_refs[i]]

    margins = torch.tensor([r.margin for r in records], dtype=torch.float32, device=device)
    prompt_of = [prompt_key(r) for r in records]  # micro-batches keep a prompt's pairs whole
    use_cache = cfg.cache_lower and not cfg.full and split > 0
    cache = None
    if use_cache:
        pad = tokenizer.pad_token_id
        cache = cache_lower(
            model.trunk,
            model.split,
            seqs,
            pad,
            storage=cfg.cache_storage,
            directory=out,
            drop_pages=cfg.release_lower,
        )
        if cfg.release_lower:  # from here on the model runs from the cache only
            release_lower(model.trunk, model.split)
    cache_seconds = time.perf_counter() - started

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, round(total_steps * cfg.warmup_fraction))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # Under several processes ``model`` is wrapped for data parallelism: the training step calls it, so
    # backward all-reduces the gradients; scoring without gradients calls the unwrapped one.
    model, optimizer = accelerator.prepare(model, optimizer)
    if world > 1:  # head dropout: each rank its own dice (after the shared initialisation)
        torch.manual_seed(rank_seed(cfg.seed, accelerator))
    scorer = _Scorer(accelerator.unwrap_model(model), seqs, starts, tokenizer.pad_token_id, cache, device)

    # Where the run stands: a fresh start, or the last checkpoint of a killed run.
    step, train_seconds, eval_metrics, pairs_seen, epochs_run, probe_seconds = 0, 0.0, {}, 0, 0, 0.0
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (validation loss, epoch, weights)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        weights, torch_state, state = load_checkpoint(checkpoint, trainable_state(scorer.model), rank, world)
        _restore(scorer.model, weights)
        optimizer.load_state_dict(torch_state["optimizer"])
        scheduler.load_state_dict(torch_state["scheduler"])
        if "best_weights" in torch_state:
            best = (state["best_loss"], state["best_epoch"], torch_state["best_weights"])
        step, train_seconds, pairs_seen = state["step"], state["train_seconds"], state["pairs_seen"]
        epochs_run, eval_metrics, probe_seconds = state["epochs_run"], state["eval_metrics"], state["probe_seconds"]
    accelerator.wait_for_everyone()  # every rank has read the run before rank 0 rewrites it
    if main and checkpoint is not None:
        console.print(f"resuming {out} from step {step} ({checkpoint.name})")
        truncate_metrics(out, step)  # a killed run's rows after its checkpoint are redone
    elif main:  # a new run, or one killed before its first checkpoint: from the start
        (out / "metrics.jsonl").unlink(missing_ok=True)
        for old in list_checkpoints(out):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()

    def save(epoch_rows_done: int) -> None:
        torch_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        trainer_state = {
            "train_seconds": train_seconds,
            "pairs_seen": pairs_seen,
            "epochs_run": epoch_rows_done,
            "eval_metrics": eval_metrics,
            "probe_seconds": probe_seconds,
        }
        if best is not None:
            torch_state["best_weights"] = best[2]
            trainer_state.update(best_loss=best[0], best_epoch=best[1])
        rngs = all_rng_states(accelerator, rng_state())  # every rank's, written by rank 0
        if main:
            weights = trainable_state(scorer.model)
            save_checkpoint(out, step, weights, torch_state, trainer_state, cfg.keep_checkpoints, rngs)
        accelerator.wait_for_everyone()

    log = MetricsLog(out, "reward") if main else None
    if cfg.head_init == "probe" and checkpoint is None:  # LP-FT: the head starts as the best linear probe
        t0 = time.perf_counter()
        model.eval()
        feats = scorer.features(flat(fit_idx))
        weight = fit_linear_probe(feats[0::2].cpu(), feats[1::2].cpu(), margins[fit_idx].cpu(), cfg.probe_l2)
        with torch.no_grad():
            scorer.model.head.weight.copy_(weight[None])
            scorer.model.head.bias.zero_()
        probe_seconds = time.perf_counter() - t0
        if val_idx:  # the probe alone is a candidate too ("epoch 0")
            s = scorer.all(flat(val_idx))
            val_metrics = _pair_metrics(s[0::2], s[1::2], margins[val_idx])
            best = (val_metrics["loss"], 0, _trainable_copy(scorer.model))
            if log is not None:
                log.write({"step": 0, "epoch": 0, **{f"val_{k}": v for k, v in val_metrics.items()}})
    stopped_early = best is not None and cfg.patience and epochs_run - best[1] >= cfg.patience
    with progress_bar("reward train", disable=not main) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, info="")
        first_epoch, skip = divmod(step, steps_per_epoch)
        for epoch in range(first_epoch, 0 if stopped_early else cfg.epochs):
            model.train()
            for pair_idx in batches.epoch_batches(epoch, skip if epoch == first_epoch else 0):
                t0 = time.perf_counter()
                pairs_seen += len(pair_idx)
                # This rank's share of the pairs, through the wrapped model (a shared sequence runs once);
                # its mean loss weighted so that the all-reduced gradient is the whole batch's.
                mine = pair_idx[rank_slice(len(pair_idx), rank, world)]
                # In chunks of at most --micro-batch sequences, gradients summed: the same step, less
                # activation memory. Each chunk's loss is its pairs' share of the mean.
                # Every rank holds the same pair_idx, so the share needs no all-reduce (the one below,
                # for finiteness, must wait for the losses).
                scale = accelerator.num_processes * len(mine) / len(pair_idx)
                chunks = micro_batches(mine, pair_refs, cfg.micro_batch, prompt_of)
                loss_sum, chosen_parts, rejected_parts = 0.0, [], []
                for k, chunk in enumerate(chunks):
                    unique, inverse = torch.unique(torch.tensor(flat(chunk)), return_inverse=True)
                    with accelerator.no_sync(model) if k < len(chunks) - 1 else nullcontext():
                        scores = scorer(unique.tolist(), model)[inverse.to(device)]
                        chosen, rejected = scores[0::2], scores[1::2]
                        loss = bradley_terry_loss(chosen, rejected, margins[chunk])
                        if len(chunks) > 1:
                            loss = loss * (len(chunk) / len(mine))
                        # NaN/inf: raised below, before the optimizer step, on every rank together
                        accelerator.backward(loss * scale if scale != 1.0 else loss)
                    loss_sum += float(loss.detach())
                    chosen_parts.append(chosen.detach())
                    rejected_parts.append(rejected.detach())
                _, finite = global_loss_scale(accelerator, len(mine), math.isfinite(loss_sum))
                if not finite:
                    raise RlhfkitError(
                        f"step {step + 1}: the loss turned NaN/inf (earlier weights are in checkpoints/); "
                        "start again with a lower --learning-rate"
                    )
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                means = {
                    "loss": loss_sum,
                    "accuracy": pairwise_accuracy(torch.cat(chosen_parts), torch.cat(rejected_parts)),
                }
                row = {
                    "step": step,
                    "epoch": epoch + (step - epoch * steps_per_epoch) / steps_per_epoch,
                    **mean_over_ranks(accelerator, means, len(mine)),  # the whole batch's
                    "learning_rate": scheduler.get_last_lr()[0],
                    "seconds": seconds,
                }
                if log is not None:
                    log.write(row)
                progress.update(task, advance=1, info=f"loss {row['loss']:.3f} acc {row['accuracy']:.2f}")
                if cfg.save_every and step % cfg.save_every == 0 and step % steps_per_epoch:
                    save(epochs_run)  # mid-epoch; the epoch's end saves below
            model.eval()
            epochs_run = epoch + 1
            row = {"step": step, "epoch": epoch + 1}
            if val_idx:
                s = scorer.all(flat(val_idx))
                val_metrics = _pair_metrics(s[0::2], s[1::2], margins[val_idx])
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
                if best is None or val_metrics["loss"] < best[0]:
                    best = (val_metrics["loss"], epoch + 1, _trainable_copy(scorer.model))
            if eval_idx:
                s = scorer.all(flat(eval_idx))
                eval_metrics = _pair_metrics(s[0::2], s[1::2], margins[eval_idx])
                row.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                agreement = judge_agreement([records[i] for i in eval_idx], s[0::2], s[1::2])
                if agreement is not None:
                    row["eval_judge_accuracy"] = agreement
            if len(row) > 2 and log is not None:
                log.write(row)
            save(epochs_run)
            if best is not None and cfg.patience and epoch + 1 - best[1] >= cfg.patience:
                break
    if log is not None:
        log.close()

    model = accelerator.unwrap_model(model).eval()
    restored = best is not None and best[1] != epochs_run
    if restored:
        _restore(model, best[2])
    judge_accuracy = None
    if eval_idx:
        s = scorer.all(flat(eval_idx))
        if restored or epochs_run == 0:
            eval_metrics = _pair_metrics(s[0::2], s[1::2], margins[eval_idx])
        judge_accuracy = judge_agreement([records[i] for i in eval_idx], s[0::2], s[1::2])
    train_scores = scorer.all(flat(train_idx))
    metrics = {
        "eval_accuracy": eval_metrics.get("accuracy"),
        "eval_loss": eval_metrics.get("loss"),
        "mean_margin": eval_metrics.get("mean_margin"),
        "eval_judge_accuracy": judge_accuracy,
        "train_accuracy": pairwise_accuracy(train_scores[0::2], train_scores[1::2]),
        "score_mean": float(train_scores.mean()),
        "score_std": float(train_scores.std()) if len(train_scores) > 1 else 1.0,
        "train_pairs": len(fit_idx),
        "validation_pairs": len(val_idx),
        "eval_pairs": len(eval_idx),
        "epochs": epochs_run,
        "best_epoch": best[1] if best is not None else epochs_run,
        "validation_loss": best[0] if best is not None else None,
        "cache_seconds": round(cache_seconds, 2),
        "probe_seconds": round(probe_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_100_pairs": round(100 * train_seconds / max(1, pairs_seen), 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if cache is not None:
        cache.close()  # the disk cache's file goes now
    if main:
        _save_reward_model(model, tokenizer, out, cfg)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write_model_card(out, cfg, metrics)
    if show_summary:
        print_table("reward model", metrics)  # rank 0 alone prints
    accelerator.wait_for_everyone()
    return metrics


def _save_reward_model(model: RewardModel, tokenizer, out: Path, cfg: RewardTrainConfig) -> None:
    """Weights, then the head; ``metrics.json`` (written after) marks a complete directory."""
    if cfg.full:
        model.trunk.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    elif cfg.lora_r > 0:
        model.trunk.save_pretrained(out / "adapter")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, out / "head.safetensors")


def _write_model_card(out: Path, cfg: RewardTrainConfig, metrics: dict) -> None:
    kind = "full fine-tune" if cfg.full else f"LoRA r={cfg.lora_r} on the top {cfg.trainable_layers or 'all'} layers"
    write_model_card(
        out,
        f"Reward model ({cfg.model})",
        "Trained by `rlhf reward train` (rlhfkit) with a pairwise Bradley-Terry loss.",
        [
            f"base model: `{cfg.model}` ({kind})",
            f"data: `{cfg.data}` ({metrics['train_pairs']} training pairs, {metrics['eval_pairs']} held out)",
            f"epochs {cfg.epochs}, batch {cfg.batch_size}, learning rate {cfg.learning_rate}, seed {cfg.seed}",
            f"score: head on the `{cfg.pooling}` pooling of the final hidden states",
        ],
        metrics,
        "metric",
        "Use: `rlhf reward score --reward-model DIR --prompt P --completion C`.",
    )

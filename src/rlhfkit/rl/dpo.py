"""DPO: direct preference optimisation of a policy straight from a preference file.

No reward model and no sampling loop: every pair ``(prompt, chosen, rejected)`` pushes the policy's
log-probability ratio to the reference up on ``chosen`` and down on ``rejected`` (Rafailov et al.,
2023). One supervised-style pass per epoch.

Recipe features:

- Losses: ``sigmoid`` (DPO; with ``label_smoothing`` eps it is conservative DPO,
  ``-(1-eps) log sig(beta h) - eps log sig(-beta h)``) and ``ipo`` (Azar et al., 2023,
  ``(h - 1/(2 beta))^2`` on per-token mean log-probs, TRL's normalisation), where
  ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``. Implicit reward of a
  completion: ``beta (log pi(y) - log ref(y))``. Option names and defaults follow TRL's DPOConfig
  (beta 0.1, loss_type sigmoid, label_smoothing 0).
- Input: every preference form ``rlhfkit.data`` reads (TRL and Vertex rows, the labeling export),
  with its FILE:LINE errors; margins are ignored (DPO has no margin term). Each pair is
  ``formatted prompt + completion + EOS`` as the reward model sees it (``encode_pairs_with_starts``),
  log-probs over the completion's tokens and the EOS only. The held-out split is by prompt.
- One model (LoRA mode, the default): the policy is the ``default`` LoRA adapter on the top
  ``trainable_layers`` layers of the frozen base (``build_trunk``); the reference is the same base
  with the adapter disabled, so there is no second copy. The frozen lower layers run once per unique
  sequence (a completion shared by several pairs runs once) and their output is reused in every
  epoch; the reference's log-probs are computed once per sequence before the first step. Batches
  keep a prompt's pairs together (``PromptGroupedBatches``) and run each unique sequence once.
  ``full`` fine-tunes every weight; its reference log-probs come from the same weights before the
  first update, and a frozen copy is loaded only for the KL monitor.
- ``metrics.jsonl`` per step: ``loss``, ``accuracy`` (chosen implicit reward above rejected; a tie
  counts half), ``rewards_chosen`` / ``rewards_rejected`` / ``margin``, ``logps_chosen`` /
  ``logps_rejected`` (summed over the completion), ``learning_rate``, ``seconds``; with
  ``monitor_prompts``, ``monitor_kl`` (KL(policy || reference), nats per response sampled at
  temperature 1 on fixed held-out prompts with fixed dice) and ``monitor_length``. When both
  implicit rewards stay below zero for ``falling_window`` steps (the policy makes the preferred
  completions less likely too, a known DPO failure) a warning is printed once and the rows carry
  ``alerts: ["logps_falling"]``.
- The run directory is PPO's: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (trainable
  weights, optimizer, scheduler and every RNG; the data position follows from the step), ``adapter/``
  (peft) or ``model/``, ``metrics.json`` (held-out accuracy and loss) and a model card, so
  ``rlhf eval``, ``rlhf serve`` and ``rlhf export`` take it unchanged. ``--resume`` continues from the
  last checkpoint and reproduces a straight run's metrics.
- N data-parallel processes (``torchrun`` or ``accelerate launch``): each optimizer step's batch of
  pairs is split into contiguous near-equal shares, one per rank; each rank's loss is the mean over
  its pairs, weighted so that the all-reduced gradient is that of the whole batch's mean, and the
  logged numbers are means over the whole batch. The reference's and the held-out log-probs are
  split by batches of sequences and exchanged; the frozen layers' cache is built on every rank.
  Rank 0 alone writes the run directory and runs the KL monitor.

Limits: a batch runs as one forward and backward per rank (no gradient accumulation);
the frozen layers' output of every unique sequence stays in memory (tokens x hidden size x 4 bytes:
about 0.6 MB for 256 tokens of SmolLM2-135M); ``max_length`` cuts long pairs as the reward model
does (the prompt from the left, then the completion).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from rlhfkit.config import REQUIRED, option
from rlhfkit.console import progress_bar
from rlhfkit.data import load_preferences, load_prompts, write_text_atomic
from rlhfkit.distributed import (
    all_rng_states,
    gather_objects,
    global_loss_scale,
    make_accelerator,
    mean_over_ranks,
    rank_slice,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.models import (
    DEFAULT_MODEL,
    DTYPE_HELP,
    build_trunk,
    cache_lower,
    checkpointed_layers,
    final_hidden,
    load_causal_lm,
    load_tokenizer,
    model_device,
    resolve_dtype,
    trainable_state,
    upper_hidden,
)
from rlhfkit.reward import (
    PromptGroupedBatches,
    dedupe_sequences,
    encode_pairs_with_starts,
    pairwise_accuracy,
    split_by_prompt,
)
from rlhfkit.rl.roles import response_logprobs
from rlhfkit.rundir import (
    MetricsLog,
    latest_checkpoint,
    load_checkpoint,
    open_run,
    read_metrics,
    rng_state,
    save_checkpoint,
    truncate_metrics,
    write_model_card,
)

console = Console(stderr=True)
LOSS_TYPES = ("sigmoid", "ipo")
FALLING = "logps_falling"


@dataclass
class DPOConfig:
    """Options of ``rlhf dpo``."""

    data: str = option(REQUIRED, "Preference file (TRL or Vertex rows, the labeling export; .jsonl/.json/.parquet).")
    out: str = option(REQUIRED, "Run directory to create.")
    policy: str = option(DEFAULT_MODEL, "Policy model: smollm2-135m, tiny-random, a model directory or org/name.")
    resume: str = option("", "Continue the run in this directory from its last checkpoint.")
    beta: float = option(0.1, "Strength of the pull to the reference (higher = stays closer); IPO's tau.")
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo (squared loss on per-token mean log-ratios).")
    label_smoothing: float = option(
        0.0, "Share of labels assumed flipped (conservative DPO, sigmoid loss only), in [0, 0.5)."
    )
    epochs: int = option(1, "Passes over the training pairs.")
    max_steps: int = option(
        0, "Stop after N optimizer steps in total (0 = when the epochs end); the only option --resume may change."
    )
    batch_size: int = option(8, "Pairs per optimizer step.")
    learning_rate: float = option(1e-4, "Peak AdamW learning rate (linear warm-up, then linear decay to 0).")
    warmup_fraction: float = option(0.1, "Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    max_length: int = option(256, "Longest prompt+completion in tokens; longer ones are cut.")
    eval_fraction: float = option(0.1, "Fraction of prompts held out; their accuracy and loss go to metrics.json.")
    seed: int = option(0, "Seed of the split, the batch order and the adapter's initialisation.")
    full: bool = option(False, "Fine-tune every weight instead of LoRA adapters (wants a far lower learning rate).")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    trainable_layers: int = option(
        4, "LoRA on the top N layers only; the frozen ones below run once per sequence (0 = all)."
    )
    gradient_checkpointing: bool = option(
        True,
        "Recompute the trained layers' activations in backward instead of keeping them "
        "(less memory, one more forward of those layers).",
    )
    dtype: str = option("auto", DTYPE_HELP)
    save_every: int = option(50, "Checkpoint every N steps (the last step is always saved).")
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (oldest removed).")
    monitor_prompts: str = option(
        "", "Held-out prompts: KL to the reference of responses sampled on them is logged (empty = off)."
    )
    monitor_num_prompts: int = option(16, "Prompts (the first N of the file) the KL monitor samples on.")
    monitor_every: int = option(10, "Run the KL monitor every N steps (and at the first and last step).")
    monitor_max_new_tokens: int = option(32, "Longest response the KL monitor samples, in tokens.")
    falling_window: int = option(
        5, "Warn when both implicit rewards (chosen and rejected) stay below zero for this many steps."
    )

    def __post_init__(self) -> None:
        checks = {
            "beta must be > 0": self.beta > 0,
            f"loss_type must be one of {', '.join(LOSS_TYPES)}": self.loss_type in LOSS_TYPES,
            "label_smoothing must be in [0, 0.5)": 0 <= self.label_smoothing < 0.5,
            "label_smoothing applies to the sigmoid loss only": not self.label_smoothing or self.loss_type == "sigmoid",
            "epochs must be >= 1": self.epochs >= 1,
            "max_steps must be >= 0": self.max_steps >= 0,
            "batch_size must be >= 1": self.batch_size >= 1,
            "learning_rate must be > 0": self.learning_rate > 0,
            "warmup_fraction must be in [0, 1)": 0 <= self.warmup_fraction < 1,
            "max_length must be >= 8": self.max_length >= 8,
            "eval_fraction must be in [0, 1)": 0 <= self.eval_fraction < 1,
            "lora_r must be >= 1 (or use --full)": self.full or self.lora_r >= 1,
            "trainable_layers must be >= 0": self.trainable_layers >= 0,
            "save_every must be >= 0": self.save_every >= 0,
            "keep_checkpoints must be >= 1": self.keep_checkpoints >= 1,
            "monitor_num_prompts, monitor_every and monitor_max_new_tokens must be >= 1": min(
                self.monitor_num_prompts, self.monitor_every, self.monitor_max_new_tokens
            )
            >= 1,
            "falling_window must be >= 1": self.falling_window >= 1,
        }
        failed = [text for text, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))


# ----------------------------------------------------------------------------------------------
# The math


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss, chosen implicit rewards, rejected implicit rewards)`` of a batch of pairs.

    Log-probs are per completion: summed over its tokens for ``sigmoid``, the per-token mean for
    ``ipo`` (the caller divides; TRL's normalisation, which keeps IPO's target ``1/(2 beta)`` the
    same for short and long completions). The rewards are detached: they are for the log.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # label_smoothing = the chance a label is flipped: a bit of the loss pulls the other way.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (expected one of {', '.join(LOSS_TYPES)})")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def logps_falling(rows: Sequence[dict[str, Any]], window: int) -> bool:
    """True when in each of the last ``window`` step rows both implicit rewards are below zero.

    A negative implicit reward means the policy made those completions less likely than the
    reference did: DPO only needs the gap to grow, and often gets it by lowering both.
    """
    steps = [r for r in rows if "rewards_chosen" in r][-window:]
    return len(steps) == window and all(r["rewards_chosen"] < 0 and r["rewards_rejected"] < 0 for r in steps)


# ----------------------------------------------------------------------------------------------
# Sequences: packed so every completion starts in the same column


@dataclass
class Packed:
    """Rows laid out as ``[pad.. prompt | completion + EOS ..pad]``: the prompt left-padded to
    ``query_len``, the completion right-padded, so ``response_logprobs`` reads one column range."""

    ids: torch.Tensor  # (B, query_len + R)
    mask: torch.Tensor
    completion_mask: torch.Tensor  # (B, R) float, 1 on the completion's tokens and its EOS
    query_len: int
    lower: torch.Tensor | None  # (B, query_len + R, d) cached lower-layer output in the same layout

    def to(self, device: torch.device) -> Packed:
        lower = self.lower.to(device) if self.lower is not None else None
        return Packed(self.ids.to(device), self.mask.to(device), self.completion_mask.to(device), self.query_len, lower)


def pack(
    idx: Sequence[int],
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_id: int,
    cache: Sequence[torch.Tensor] | None = None,
) -> Packed:
    q = max(starts[i] for i in idx)
    r = max(len(seqs[i]) - starts[i] for i in idx)
    ids = torch.full((len(idx), q + r), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), q + r), dtype=torch.long)
    completion_mask = torch.zeros((len(idx), r))
    lower = cache[idx[0]].new_zeros((len(idx), q + r, cache[idx[0]].shape[-1])) if cache is not None else None
    for row, i in enumerate(idx):
        seq, begin = seqs[i], q - starts[i]
        ids[row, begin : begin + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, begin : begin + len(seq)] = 1
        completion_mask[row, : len(seq) - starts[i]] = 1
        if lower is not None and cache is not None:
            lower[row, begin : begin + len(seq)] = cache[i]
    return Packed(ids, mask, completion_mask, q, lower)


def completion_logps(model: nn.Module, split: int, batch: Packed, gradient_checkpointing: bool = False) -> torch.Tensor:
    """Summed log-probs (temperature 1) of each row's completion tokens and EOS under ``model`` as it is now."""
    with checkpointed_layers(model, split) if gradient_checkpointing else nullcontext():
        if batch.lower is not None:
            hidden = upper_hidden(model, batch.lower, batch.mask, split)
        else:
            hidden = final_hidden(model, batch.ids, batch.mask)
    token_logps, _ = response_logprobs(model, hidden, batch.ids, batch.query_len, 1.0)
    return (token_logps * batch.completion_mask).sum(-1)


class CompletionLogps(nn.Module):
    """``completion_logps`` of the trunk as a module: the training step calls it (not a function on
    the trunk), so the accelerator's data-parallel wrapper sees the forward."""

    def __init__(self, trunk: nn.Module, split: int, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.trunk, self.split, self.gradient_checkpointing = trunk, split, gradient_checkpointing

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        completion_mask: torch.Tensor,
        query_len: int,
        lower: torch.Tensor | None,
    ) -> torch.Tensor:
        batch = Packed(ids, mask, completion_mask, query_len, lower)
        return completion_logps(self.trunk, self.split, batch, self.gradient_checkpointing)


class PairSequences:
    """Every pair's unique sequences (a completion in several pairs is one sequence), their cached
    lower-layer output and their reference log-probs, scored by sequence index."""

    def __init__(
        self, seqs: list[list[int]], starts: list[int], pad_id: int, split: int, device: torch.device | str = "cpu"
    ) -> None:
        bad = [i for i, s in enumerate(starts) if s < 1]
        if bad:
            raise RlhfkitError(f"{len(bad)} completions have an empty prompt: DPO needs a prompt to condition on")
        self.seqs, self.starts, self.pad_id, self.split = seqs, starts, pad_id, split
        self.device = torch.device(device)
        lengths = [len(s) - b for s, b in zip(seqs, starts, strict=True)]
        self.lengths = torch.tensor(lengths, dtype=torch.float32, device=self.device)
        self.cache: list[torch.Tensor] | None = None
        self.ref_logps = torch.zeros(len(seqs), device=self.device)

    def cache_lower(self, trunk: nn.Module) -> None:
        """The frozen layers' output of every sequence, once (``split`` 0 = nothing frozen to cache)."""
        if self.split > 0:
            self.cache = cache_lower(trunk, self.split, self.seqs, self.pad_id)

    def packed(self, idx: Sequence[int]) -> Packed:
        return pack(idx, self.seqs, self.starts, self.pad_id, self.cache).to(self.device)

    def logps(self, policy: nn.Module, idx: Sequence[int]) -> torch.Tensor:
        """Completion log-probs of sequences ``idx`` under ``policy`` (a ``CompletionLogps``, possibly
        wrapped by the accelerator), with gradients when enabled."""
        b = self.packed(idx)
        return policy(b.ids, b.mask, b.completion_mask, b.query_len, b.lower)

    @torch.no_grad()
    def all_logps(
        self, policy: nn.Module, idx: Sequence[int], batch_size: int = 32, accelerator: Any = None
    ) -> torch.Tensor:
        """``logps`` of many sequences, each unique one once, in length-sorted batches.

        ``accelerator`` (several processes): rank r runs every N-th batch from the r-th and the ranks
        exchange the numbers; the batches are the ones a single process runs, so the numbers are too.
        ``policy`` must then be the unwrapped module: the ranks run different numbers of forwards.
        """
        order = sorted(set(idx), key=lambda i: len(self.seqs[i]))
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        found: list[tuple[int, float]] = []
        for s in range(rank * batch_size, len(order), world * batch_size):
            chunk = order[s : s + batch_size]
            found += zip(chunk, self.logps(policy, chunk).tolist(), strict=True)
        out = dict(gather_objects(accelerator, found) if accelerator is not None else found)
        return torch.tensor([out[i] for i in idx], device=self.device)


# ----------------------------------------------------------------------------------------------
# The KL monitor


class KLMonitor:
    """KL(policy || reference) per response on a fixed batch of held-out prompts, sampled with fixed
    dice at temperature 1 (the training run's random stream is untouched, so resume stays exact)."""

    def __init__(self, path: str, num_prompts: int, tokenizer, max_prompt_tokens: int, max_new_tokens: int) -> None:
        held = load_prompts(path)[:num_prompts]
        if not held:
            raise RlhfkitError(f"{path}: no prompts for the KL monitor")
        self.queries = [ids[-max_prompt_tokens:] for ids in encode_prompts(tokenizer, [r.prompt for r in held])]
        self.tokenizer = tokenizer
        self.params = SamplingParams(max_new_tokens, 1.0, 1.0)

    @torch.no_grad()
    def run(
        self, policy: nn.Module, reference: nn.Module, reference_on: Callable[[], AbstractContextManager], seed: int
    ) -> dict[str, float]:
        kls: list[float] = []
        lengths: list[float] = []
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            for start in range(0, len(self.queries), 16):
                chunk = self.queries[start : start + 16]
                query_ids, query_mask = left_pad(chunk, self.tokenizer.pad_token_id, model_device(policy))
                batch = sample_batch(policy, self.tokenizer, query_ids, query_mask, self.params)
                ids = torch.cat([query_ids, batch.responses], dim=1)
                mask = torch.cat([query_mask, batch.mask], dim=1)
                q = query_ids.shape[1]
                logps = response_logprobs(policy, final_hidden(policy, ids, mask), ids, q, 1.0)[0]
                with reference_on():
                    ref = response_logprobs(reference, final_hidden(reference, ids, mask), ids, q, 1.0)[0]
                kls += ((logps - ref) * batch.mask).sum(-1).tolist()
                lengths += batch.lengths.float().tolist()
        return {"monitor_kl": sum(kls) / len(kls), "monitor_length": sum(lengths) / len(lengths)}


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: DPOConfig, accelerator: Any = None) -> dict[str, Any]:
    """Run (or continue) DPO in ``cfg.out``, this process on its share of every batch; returns the final
    metrics (also in ``metrics.json``). ``accelerator``: the run's (``run_dpo`` makes it before the
    run directory, which rank 0 alone writes)."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    out = Path(cfg.out)
    if accelerator is None:
        accelerator = make_accelerator()
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    # 1. Pairs, split by prompt, tokenised once; each unique sequence once. Every rank takes a share
    #    of each batch, so the smallest (an epoch's last) needs a pair per rank.
    records = load_preferences(cfg.data)
    train_idx, eval_idx = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    if not train_idx:
        raise RlhfkitError(f"{cfg.data}: no training pairs left after holding out {cfg.eval_fraction:.0%} of prompts")
    batches = PromptGroupedBatches(records, train_idx, cfg.batch_size, cfg.seed)
    smallest = batches.smallest(cfg.epochs)
    rank_slice(smallest, rank, world, f"--batch-size {cfg.batch_size} (smallest batch: {smallest} pairs)")
    tokenizer = load_tokenizer(cfg.policy)
    seqs, starts, pair_refs = dedupe_sequences(encode_pairs_with_starts(tokenizer, records, cfg.max_length))

    def flat(pair_idx: Sequence[int]) -> list[int]:  # chosen, rejected, chosen, rejected, ...
        return [seq for i in pair_idx for seq in pair_refs[i]]

    # 2. The policy: LoRA on the top layers of the frozen base (or every weight with --full).
    set_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    base = load_causal_lm(cfg.policy, dtype)
    trunk, split = build_trunk(base, cfg.full, cfg.lora_r, cfg.lora_alpha, cfg.trainable_layers)
    trunk.to(device)
    core = CompletionLogps(trunk, split, cfg.gradient_checkpointing)
    data = PairSequences(seqs, starts, tokenizer.pad_token_id, split, device)

    # 3. The frozen lower layers once (on every rank), then the reference's log-probs once per
    #    sequence (each rank a share, exchanged): adapters off in LoRA mode; with --full, the same
    #    weights before any update (also on resume: the checkpoint is loaded after this).
    data.cache_lower(trunk)
    reference_on = trunk.disable_adapter if hasattr(trunk, "disable_adapter") else nullcontext
    with reference_on():
        data.ref_logps = data.all_logps(core, range(len(seqs)), accelerator=accelerator)
    average = cfg.loss_type == "ipo"  # IPO reads per-token mean log-probs

    # 4. Optimizer, warm-up then linear decay; resume from the last checkpoint.
    params = [p for p in trunk.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batches)
    total = steps_per_epoch * cfg.epochs  # the schedule spans every epoch, even when max_steps stops earlier
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = max(1, round(total * cfg.warmup_fraction))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # Under several processes the policy is wrapped for data parallelism: its forward is the training
    # step's, so backward all-reduces the gradients. Scoring without gradients calls ``core``.
    policy, optimizer = accelerator.prepare(core, optimizer)
    step = 0
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        weights, torch_state, trainer_state = load_checkpoint(checkpoint, trainable_state(trunk), rank, world)
        trunk.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(torch_state["optimizer"])
        scheduler.load_state_dict(torch_state["scheduler"])
        step = int(trainer_state["step"])
    if cfg.resume:
        accelerator.wait_for_everyone()  # every rank has read the run before rank 0 rewrites its log
        if main:
            if checkpoint is not None:
                console.print(f"resuming {out} from step {step} ({checkpoint.name})")
            truncate_metrics(out, step)  # a killed run's rows after its checkpoint are redone
        accelerator.wait_for_everyone()
    monitor = reference = None
    if cfg.monitor_prompts:  # read on every rank (a bad file fails them all), sampled on rank 0
        room = max(1, cfg.max_length - cfg.monitor_max_new_tokens)
        monitor = KLMonitor(cfg.monitor_prompts, cfg.monitor_num_prompts, tokenizer, room, cfg.monitor_max_new_tokens)
        # --full: the policy moves, so the reference is a frozen copy (only the monitor needs one).
        if main:
            reference = load_causal_lm(cfg.policy, dtype, device).requires_grad_(False) if cfg.full else trunk
    setup_seconds = time.perf_counter() - started

    # 5. The loop: one optimizer step per batch of pairs.
    rows = read_metrics(out)
    falling = logps_falling(rows, cfg.falling_window)
    train_seconds, pairs_seen = 0.0, 0
    with MetricsLog(out, "dpo") if main else nullcontext() as log, progress_bar("dpo", disable=not main) as progress:
        task = progress.add_task("dpo", total=last, completed=step, info="")
        for epoch, pair_idx in batches.from_step(step):
            if step >= last:
                break
            t0 = time.perf_counter()
            # 5a. This rank's share of the pairs; the policy's log-probs of their unique sequences (one
            #     forward on every rank), spread to the pairs.
            mine = pair_idx[rank_slice(len(pair_idx), rank, world)]
            seq_idx = flat(mine)
            unique, inverse = torch.unique(torch.tensor(seq_idx), return_inverse=True)
            logps = data.logps(policy, unique.tolist())[inverse.to(device)]
            ref, n_tokens = data.ref_logps[seq_idx], data.lengths[seq_idx]
            if average:
                logps, ref = logps / n_tokens, ref / n_tokens
            # 5b. The loss (the mean over this rank's pairs, weighted to the whole batch's mean), one step.
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                logps[0::2], logps[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.loss_type, cfg.label_smoothing
            )
            scale, finite = global_loss_scale(accelerator, len(mine), math.isfinite(float(loss.detach())))
            if not finite:
                raise RlhfkitError(
                    f"step {step + 1}: the loss turned NaN/inf (earlier weights are in checkpoints/); "
                    "start again with a lower --learning-rate"
                )
            learning_rate = scheduler.get_last_lr()[0]
            accelerator.backward(loss * scale if scale != 1.0 else loss)
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # 5c. The row: losses and rewards (the log-probs as sums over each completion), the whole batch's means.
            sums = logps.detach() * n_tokens if average else logps.detach()
            means = {
                "loss": float(loss.detach()),
                "accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
                "rewards_chosen": float(chosen_rewards.mean()),
                "rewards_rejected": float(rejected_rewards.mean()),
                "margin": float((chosen_rewards - rejected_rewards).mean()),
                "logps_chosen": float(sums[0::2].mean()),
                "logps_rejected": float(sums[1::2].mean()),
            }
            row: dict[str, Any] = {
                "step": step,
                "epoch": step / steps_per_epoch,
                **mean_over_ranks(accelerator, means, len(mine)),
                "learning_rate": learning_rate,
                "pairs": len(pair_idx),
            }
            row["seconds"] = time.perf_counter() - t0
            train_seconds += row["seconds"]
            pairs_seen += len(pair_idx)
            # 5d. The KL monitor on held-out prompts (rank 0), and the falling-log-probs warning.
            if monitor is not None and main and (step == 1 or step % cfg.monitor_every == 0 or step == last):
                t1 = time.perf_counter()
                row.update(monitor.run(trunk, reference, reference_on, cfg.seed))
                row["time_monitor"] = time.perf_counter() - t1
            rows.append(row)
            now_falling = logps_falling(rows, cfg.falling_window)
            if now_falling:
                row["alerts"] = [FALLING]
                if not falling and main:
                    console.print(
                        f"[yellow]step {step}: chosen and rejected completions have both been less likely than "
                        f"under the reference for {cfg.falling_window} steps: DPO is lowering the preferred "
                        "completions too (a known failure; try a larger --beta, a lower --learning-rate or "
                        "--loss-type ipo)[/yellow]"
                    )
            falling = now_falling
            if log is not None:
                log.write(row)
            # 5e. Checkpoint (the last step always): rank 0 writes it, with every rank's random state.
            if step == last or (cfg.save_every and step % cfg.save_every == 0):
                rngs = all_rng_states(accelerator, rng_state())
                if main:
                    save_checkpoint(
                        out,
                        step,
                        trainable_state(trunk),
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                        {"epoch": epoch},
                        cfg.keep_checkpoints,
                        rngs,
                    )
                accelerator.wait_for_everyone()
            info = f"loss {row['loss']:.3f} acc {row['accuracy']:.2f} margin {row['margin']:+.3f}"
            progress.update(task, completed=step, info=info)

    # 6. Held-out accuracy and loss; rank 0 writes the adapter (or model), metrics.json and the card.
    metrics: dict[str, Any] = {"steps": step, "epochs": step / steps_per_epoch, "train_pairs": len(train_idx)}
    metrics.update(held_out_metrics(core, data, [pair_refs[i] for i in eval_idx], cfg, accelerator))
    metrics.update(
        {
            "setup_seconds": round(setup_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "pairs_per_second": round(pairs_seen / train_seconds, 3) if train_seconds else None,
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
    )
    if main:
        save_policy(trunk, tokenizer, out, cfg.full)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write_card(out, cfg, metrics)
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def held_out_metrics(
    policy: nn.Module, data: PairSequences, pairs: Sequence[tuple[int, int]], cfg: DPOConfig, accelerator: Any = None
) -> dict:
    """Held-out loss, accuracy, implicit rewards and the log-prob margin now and under the reference.
    ``policy``: the unwrapped ``CompletionLogps``; ``accelerator``: the ranks share the scoring."""
    keys = ("eval_pairs", "eval_accuracy", "eval_loss", "eval_margin", "eval_rewards_chosen", "eval_rewards_rejected")
    if not pairs:
        return {k: (0 if k == "eval_pairs" else None) for k in (*keys, "eval_logp_margin", "eval_ref_logp_margin")}
    seq_idx = [s for pair in pairs for s in pair]
    logps, ref = data.all_logps(policy, seq_idx, accelerator=accelerator), data.ref_logps[seq_idx]
    sums, ref_sums = logps, ref
    if cfg.loss_type == "ipo":
        logps, ref = logps / data.lengths[seq_idx], ref / data.lengths[seq_idx]
    loss, chosen, rejected = dpo_loss(
        logps[0::2], logps[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.loss_type, cfg.label_smoothing
    )
    return {
        "eval_pairs": len(pairs),
        "eval_accuracy": pairwise_accuracy(chosen, rejected),
        "eval_loss": float(loss),
        "eval_margin": float((chosen - rejected).mean()),
        "eval_rewards_chosen": float(chosen.mean()),
        "eval_rewards_rejected": float(rejected.mean()),
        # log pi(chosen) - log pi(rejected), summed over each completion: DPO should raise it above the reference's.
        "eval_logp_margin": float((sums[0::2] - sums[1::2]).mean()),
        "eval_ref_logp_margin": float((ref_sums[0::2] - ref_sums[1::2]).mean()),
    }


def save_policy(trunk: nn.Module, tokenizer, out: Path, full: bool) -> None:
    """``adapter/`` (peft, adapter ``default``) or, with ``full``, ``model/`` with the tokenizer."""
    if full:
        trunk.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    else:
        trunk.save_pretrained(out / "adapter")


def _write_card(out: Path, cfg: DPOConfig, metrics: dict[str, Any]) -> None:
    kind = "full fine-tune" if cfg.full else f"LoRA r={cfg.lora_r} on the top {cfg.trainable_layers or 'all'} layers"
    loss = cfg.loss_type + (f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else "")
    write_model_card(
        out,
        f"DPO policy ({cfg.policy})",
        "Trained by `rlhf dpo` (rlhfkit): direct preference optimisation on a preference file, no reward model.",
        [
            f"base model: `{cfg.policy}` ({kind})",
            f"data: `{cfg.data}` ({metrics['train_pairs']} training pairs, {metrics['eval_pairs']} held out by prompt)",
            f"loss: {loss}, beta {cfg.beta}",
            f"steps: {metrics['steps']} x {cfg.batch_size} pairs, learning rate {cfg.learning_rate}, seed {cfg.seed}",
        ],
        metrics,
        "metric",
        "Files: `adapter/` (peft) or `model/`, `metrics.jsonl`, `checkpoints/`. "
        "Use: `rlhf eval --adapter RUN_DIR`, `rlhf serve --adapter NAME=RUN_DIR`, `rlhf export --adapter RUN_DIR`.",
    )


def run_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Start a run, or continue one with ``resume`` (only ``max_steps`` may change); returns its metrics."""
    accelerator = make_accelerator()
    cfg = open_run(cfg, required=("data", "out"), may_change=("max_steps",), write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return train(cfg, accelerator)

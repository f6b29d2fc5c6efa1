"""What every online algorithm (PPO, GRPO, RLOO) shares: its options, its models and its run.

``RLConfig`` holds the options they all take; each algorithm's config adds its own. ``OnlineTrainer``
owns the prompts, the roles on one base (``rl.roles``), the reward, the optimizer, the monitor and
the run directory (``rlhfkit.rundir``); an algorithm subclasses it and writes its loop in ``train``:
``rollout`` -> its own update -> ``end_step`` (log, monitor, best weights, checkpoint, stop rules)
-> ``finish`` (final weights and model card).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file

from rlhfkit.config import REQUIRED, option
from rlhfkit.console import progress_bar
from rlhfkit.data import PromptRecord, load_prompts
from rlhfkit.distributed import (
    all_rng_states,
    check_divisible,
    from_main,
    full_state,
    gather_objects,
    gather_rows,
    global_loss_scale,
    is_sharded,
    load_full_state,
    load_optimizer_state,
    local_rows,
    make_accelerator,
    mean_over_ranks,
    optimizer_state,
    rank_seed,
    rank_slice,
    root_gathered,
    shard,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts
from rlhfkit.judges import distinct_n
from rlhfkit.models import DEFAULT_MODEL, DTYPE_HELP, load_tokenizer, resolve_dtype, trainable_state
from rlhfkit.rl.losses import KLController, masked_mean
from rlhfkit.rl.monitor import Alert, Monitor, detect
from rlhfkit.rl.roles import POLICY, VALUE, Roles, build_roles, is_value_param
from rlhfkit.rl.rollout import PromptStream, Rollout, collect_rollout
from rlhfkit.rl.scoring import RewardSource
from rlhfkit.rundir import (
    MetricsLog,
    latest_checkpoint,
    load_best,
    load_checkpoint,
    open_run,
    read_best,
    read_metrics,
    rng_state,
    save_best,
    save_checkpoint,
    truncate_metrics,
    write_model_card,
)

console = Console(stderr=True)
DEFAULT_MAX_STEPS = 100


@dataclass
class RLConfig:
    """Options every online algorithm takes."""

    reward: str = option(REQUIRED, "Reward: a reward-model directory, judge:NAME or module:function.")
    prompts: str = option(REQUIRED, "Prompt file (.jsonl/.json/.parquet) or builtin:NAME.")
    out: str = option(REQUIRED, "Run directory to create.")
    policy: str = option(DEFAULT_MODEL, "Policy model: smollm2-135m, tiny-random, a model directory or org/name.")
    resume: str = option("", "Continue the run in this directory from its last checkpoint.")
    max_steps: int | None = option(
        None, "Steps (one rollout batch each) in total; default 100, on --resume the run's own."
    )
    batch_size: int = option(16, "Prompts per step (rollout batch), over all processes: each takes an equal share.")
    max_new_tokens: int = option(48, "Longest response in tokens.")
    max_prompt_tokens: int = option(192, "Longest formatted prompt in tokens (cut from the left).")
    temperature: float = option(0.7, "Sampling temperature, also used for the log-probabilities.")
    learning_rate: float = option(1e-4, "AdamW learning rate.")
    lr_schedule: str = option("constant", "constant, or linear (decays to 0 at max_steps).")
    max_kl: float = option(100.0, "Stop when the mean sequence KL passes this bound (nats).")
    reward_threshold: float | None = option(None, "Stop when the moving-average reward reaches this.")
    threshold_window: int = option(5, "Steps in the reward moving average.")
    missing_eos_penalty: float | None = option(
        -1.0, "EOS penalty for responses cut without EOS, applied per eos_penalty_mode (unset = keep their score)."
    )
    eos_penalty_mode: str = option(
        "replace", "replace: a cut response's score becomes the penalty; subtract: it is lowered by |penalty| (TRL)."
    )
    normalize_reward: bool = option(True, "Normalise reward-model scores with the mean/std saved at training.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    full: bool = option(False, "Fine-tune every weight (keeps a frozen reference copy) instead of LoRA.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    trainable_layers: int = option(
        4, "LoRA on the top N layers only; the frozen ones below run once per rollout (0 = all)."
    )
    gradient_checkpointing: bool = option(
        True,
        "Recompute the trained layers' activations in backward instead of keeping them "
        "(less memory, one more forward of those layers).",
    )
    fsdp: bool = option(
        False,
        "With --full under several processes: shard weights, gradients and optimizer state over the ranks "
        "(FSDP2), the frozen reference too, instead of a whole copy on each.",
    )
    dtype: str = option("auto", DTYPE_HELP)
    save_every: int = option(10, "Checkpoint every N steps (the last step is always saved).")
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (oldest removed).")
    seed: int = option(0, "Seed of prompt order, sampling and initialisation.")
    monitor_judge: str = option(
        "", "Independent judge (not the reward) that scores the held-out monitor prompts; empty = off."
    )
    monitor_prompts: str = option(
        "", "Held-out prompts for the monitor; a fixed batch from the start of the file is used."
    )
    monitor_num_prompts: int = option(32, "Prompts in the monitor's fixed batch.")
    monitor_every: int = option(10, "Run the monitor every N steps (and at the first and last step).")
    stop_on_hacking: bool = option(
        False, "Stop at the first reward-hacking alert; the final adapter is then the monitor's best checkpoint."
    )
    hacking_window: int = option(5, "Steps (and monitor evaluations) the hacking detectors look back over.")
    monitor_drop: float = option(0.02, "A monitor fall this large over the window, with the reward rising, alerts.")
    length_ratio: float = option(2.0, "Alert when mean response length moves more than this factor from the start.")
    kl_alert: float = option(20.0, "Alert when the mean KL over the window passes this (nats per sequence).")
    min_distinct_2: float = option(
        0.4, "Alert when distinct-2 of the monitor's completions (or the rollouts') falls below this."
    )
    distinct_2_ratio: float = option(0.5, "Alert when that distinct-2 falls below this fraction of its start value.")

    def checks(self) -> dict[str, bool]:
        """Message -> holds; each algorithm's config adds its own."""
        return {
            "max_steps must be >= 1": self.max_steps is None or self.max_steps >= 1,
            "batch_size must be >= 1": self.batch_size >= 1,
            "temperature must be > 0 (the loss needs a sampling distribution)": self.temperature > 0,
            "lr_schedule must be constant or linear": self.lr_schedule in ("constant", "linear"),
            "trainable_layers must be >= 0": self.trainable_layers >= 0,
            "max_new_tokens must be >= 1": self.max_new_tokens >= 1,
            "max_prompt_tokens must be >= 1": self.max_prompt_tokens >= 1,
            "lora_r must be >= 1 (or use --full)": self.full or self.lora_r >= 1,
            "--fsdp shards a full fine-tune: it needs --full (LoRA weights are small)": self.full or not self.fsdp,
            "eos_penalty_mode must be replace or subtract": self.eos_penalty_mode in ("replace", "subtract"),
            "learning_rate must be > 0": self.learning_rate > 0,
            "save_every must be >= 0": self.save_every >= 0,
            "keep_checkpoints must be >= 1": self.keep_checkpoints >= 1,
            "--monitor-judge needs --monitor-prompts": not self.monitor_judge or bool(self.monitor_prompts),
            "monitor_every and monitor_num_prompts must be >= 1": self.monitor_every >= 1
            and self.monitor_num_prompts >= 1,
            "hacking_window must be >= 2": self.hacking_window >= 2,
            "length_ratio must be > 1": self.length_ratio > 1,
        }

    def __post_init__(self) -> None:
        failed = [text for text, ok in self.checks().items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))


class OnlineTrainer:
    """Prompts, roles, reward, optimizer, monitor and run directory of one online RL run.

    ``critic``: PPO's value function (its own adapter and head); group algorithms have none.
    ``group_size``: completions sampled per prompt.
    """

    algo = "rl"
    critic = False

    def __init__(self, cfg: RLConfig, group_size: int, mini_batch_size: int, accelerator: Any = None) -> None:
        if cfg.max_steps is None:
            cfg.max_steps = DEFAULT_MAX_STEPS
        self.cfg = cfg
        critic = self.critic
        self.group_size = group_size
        self.out = Path(cfg.out)
        self.accelerator = accelerator or make_accelerator(critic)
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        check_divisible(cfg.batch_size, self.world, "--batch-size")
        check_divisible(mini_batch_size, self.world, "--mini-batch-size")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.records: list[PromptRecord] = load_prompts(cfg.prompts)
        self.tokenizer = load_tokenizer(cfg.policy)
        self.queries = [
            ids[-cfg.max_prompt_tokens :] for ids in encode_prompts(self.tokenizer, [r.prompt for r in self.records])
        ]
        self.stream = PromptStream(len(self.records), cfg.seed)
        self.reward = RewardSource(cfg.reward, cfg.policy, cfg.full, self.device)
        roles, self.value_bias_from_scores = build_roles(
            cfg.policy,
            cfg.full,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.trainable_layers,
            critic,
            str(self.reward.adapter_dir) if self.reward.adapter_dir is not None else None,
            self.reward.adapter_split,
            self.reward.value_head_init(cfg.normalize_reward) if critic else None,
            cfg.gradient_checkpointing,
            resolve_dtype(cfg.dtype, self.device),
        )
        self.split = roles.split
        if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
            shard(roles.to(self.device), [roles.trunk, roles.value_trunk], self.accelerator)
            roles.remember_trainable()
        named = [(name, p) for name, p in roles.named_parameters() if p.requires_grad]
        self.value_params = [p for name, p in named if is_value_param(name)]
        value_ids = {id(p) for p in self.value_params}
        self.policy_params = [p for _, p in named if id(p) not in value_ids]
        # No weight decay (as TRL and CleanRL): it would pull LoRA weights to 0 on steps with no gradient.
        groups = [{"params": self.policy_params}] + ([{"params": self.value_params}] if critic else [])
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # prepare() moves the roles to the accelerator's device and, under several processes, wraps
        # them for data parallelism (gradients all-reduced in backward); sharded roles reduce their own.
        if cfg.fsdp:
            self.model = roles
        else:
            self.model, self.optimizer = self.accelerator.prepare(roles, self.optimizer)
        if self.world > 1:  # each rank samples its own completions (after the shared initialisation)
            seed = rank_seed(cfg.seed, self.accelerator)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        self.step = 0
        self.history: list[float] = []
        self.monitor = (
            Monitor(
                cfg.monitor_judge, cfg.monitor_prompts, cfg.monitor_num_prompts, self.tokenizer, cfg.max_prompt_tokens
            )
            if cfg.monitor_judge and (self.main or cfg.fsdp)  # sharded: every rank takes part in sampling
            else None
        )
        self._warned_no_signal = False
        self.kl_ctl: KLController | None = None  # PPO and RLOO steer their KL penalty with one

    def _lr_factor(self, step: int) -> float:
        if self.cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - step / self.cfg.max_steps)
        return 1.0

    @property
    def core(self) -> Roles:
        return self.accelerator.unwrap_model(self.model)

    # -- rollout ---------------------------------------------------------------------------------

    def take_prompts(self) -> list[int]:
        """This rank's share of the next ``batch_size`` prompts (every rank draws the same global batch)."""
        share = rank_slice(self.cfg.batch_size, self.accelerator.process_index, self.world)  # even: checked at start
        return self.stream.take(self.cfg.batch_size)[share]

    def rollout(self, prompt_idx: Sequence[int]) -> tuple[Rollout, dict[str, float]]:
        """``group_size`` completions for each prompt, scored, with every log-prob (and value) kept."""
        cfg = self.cfg
        with root_gathered(self.core):
            return collect_rollout(
                self.core,
                self.tokenizer,
                self.reward,
                [self.queries[i] for i in prompt_idx],
                [self.records[i].prompt for i in prompt_idx],
                self.group_size,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.normalize_reward,
                cfg.missing_eos_penalty,
                cfg.eos_penalty_mode,
                with_values=self.critic,
            )

    def gather(self, r: Rollout) -> Rollout:
        """The global batch's per-row numbers (every rank's rows, rank 0's first) for the math that needs
        the whole batch: whitening, group and batch statistics, metrics. ``ids``, ``mask`` and ``lower``
        stay this rank's: forward passes run on local rows only. One process: ``r`` itself."""
        if self.world == 1:
            return r
        acc = self.accelerator
        return dataclasses.replace(
            r,
            response_mask=gather_rows(acc, r.response_mask),
            logprobs=gather_rows(acc, r.logprobs),
            ref_logprobs=gather_rows(acc, r.ref_logprobs),
            values=gather_rows(acc, r.values) if r.values is not None else None,
            scores=gather_rows(acc, r.scores),
            penalized=gather_rows(acc, r.penalized),
            ended=gather_rows(acc, r.ended),
            entropy=gather_rows(acc, r.entropy),
            texts=gather_objects(acc, list(r.texts)),
            prompts=gather_objects(acc, list(r.prompts)),
        )

    def local(self, per_row: dict[str, torch.Tensor | None], r: Rollout) -> dict[str, torch.Tensor | None]:
        """This rank's rows of global per-row tensors, cut to its rollout's response width."""
        width = r.response_mask.shape[1]
        return {k: local_rows(self.accelerator, v, width) if v is not None else None for k, v in per_row.items()}

    def rollout_metrics(self, r: Rollout, kl_per_sequence: torch.Tensor) -> dict[str, float]:
        """What every algorithm logs about a rollout batch (same keys everywhere); ``r`` is the gathered batch."""
        n = r.scores.shape[0]
        return {
            "reward_mean": float(r.scores.mean()),
            "reward_std": float(r.scores.std()) if n > 1 else 0.0,
            "score_penalized_mean": float(r.penalized.mean()),
            "score_penalized_std": float(r.penalized.std()) if n > 1 else 0.0,
            "kl": float(kl_per_sequence.mean()),
            "entropy": float(masked_mean(r.entropy, r.response_mask)),
            "response_length": float(r.response_mask.sum(-1).mean()),
            "eos_rate": float(r.ended.float().mean()),
            "distinct_2": distinct_n(r.texts, 2),
        }

    def warn_no_signal(self, r: Rollout, what: str = "batch") -> None:
        """Say once, clearly, why a step taught nothing and what to change."""
        if self._warned_no_signal or not self.main:
            return
        self._warned_no_signal = True
        cfg = self.cfg
        value = float(r.penalized[0])
        if cfg.missing_eos_penalty is not None and not bool(r.ended.any()):
            cause = (
                f"no response ended with EOS within --max-new-tokens {cfg.max_new_tokens}, so the EOS penalty "
                f"({cfg.eos_penalty_mode}) gave every one the score {value:g}"
            )
            fix = (
                "raise --max-new-tokens, or pass --missing-eos-penalty off, or --eos-penalty-mode subtract "
                "(keeps the reward's ranking)"
            )
        else:
            cause = f"the reward gave every response of the {what} the same score"
            fix = "check the reward (a judge or function that returns a constant?)"
        console.print(
            f"[yellow]warning: step {self.step + 1}: the scores carry no signal: {cause}. "
            f"The policy update is skipped on such steps. Fix: {fix}.[/yellow]"
        )

    def minibatches(self, n: int, size: int, epochs: int) -> Iterator[torch.Tensor]:
        """Row indices of each gradient step: ``epochs`` seeded shuffles of this rank's ``n`` rows, its
        share of ``size`` (a global mini-batch) at a time; every rank takes as many steps."""
        size = max(1, size // self.world)
        seed = self.cfg.seed * 100003 + self.step
        generator = torch.Generator().manual_seed(seed)  # cpu: the same order on any device
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(self.device)  # cpu: then moved
            for start in range(0, n, size):
                yield order[start : start + size]

    def policy_passes(
        self,
        r: Rollout,
        epochs: int,
        size: int,
        loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
        per_row: dict[str, torch.Tensor | None],
        stat_keys: tuple[str, ...],
        update: bool = True,
        denominator: float | None = None,
    ) -> dict[str, float]:
        """A critic-free update: ``epochs`` passes over the rollout in mini-batches of ``size`` rows, one
        gradient step each on ``loss_fn(logprobs, **per_row sliced to the mini-batch)`` -> (loss, stats);
        then one schedule step. ``r`` is this rank's rollout, ``per_row`` global (gathered) tensors;
        ``denominator``: what the loss divides by on this rank when it is not the mini-batch's rows,
        so that ranks combine into the global mini-batch's loss. Returns the mean of each stat, ``updates``,
        ``policy_updated`` and the learning rate used."""
        learning_rate = self.scheduler.get_last_lr()[0]
        per_row = self.local(per_row, r)
        stats: dict[str, list[float]] = {key: [] for key in ("loss", *stat_keys)}
        for rows in self.minibatches(r.ids.shape[0], size, epochs) if update else []:
            lower = r.lower[rows] if r.lower is not None else None
            logprobs, _, _ = self.model(
                r.ids[rows], r.mask[rows], lower, r.query_len, self.cfg.temperature, with_values=False
            )
            batch = {k: v[rows] if v is not None else None for k, v in per_row.items()}
            loss, mb_stats = loss_fn(logprobs, **batch)
            mb_weight = denominator if denominator is not None else float(len(rows))
            self.optimizer_step(loss, weight=mb_weight)
            step_stats = {"loss": float(loss.detach()), **{key: float(mb_stats[key]) for key in stat_keys}}
            for key, value in mean_over_ranks(self.accelerator, step_stats, mb_weight).items():
                stats[key].append(value)
        self.advance_schedule()
        return {
            **{key: (sum(v) / len(v) if v else 0.0) for key, v in stats.items()},
            "updates": len(stats["loss"]),
            "policy_updated": int(update),
            "learning_rate": learning_rate,
        }

    def group_metrics(self, r: Rollout, advantages: torch.Tensor, flat_groups: float) -> dict[str, float]:
        """What group algorithms log beside PPO's keys: the signal inside the groups."""
        return {
            "group_reward_std": float(r.penalized.view(-1, r.group_size).std(dim=1).mean()),
            "zero_variance_groups": flat_groups,
            "advantage_abs_mean": float(advantages.abs().mean()),
        }

    def advance_schedule(self) -> None:
        """One learning-rate schedule step per training step, updated or not (a skipped update would
        otherwise shift a linear decay; torch warns about a scheduler step with no optimizer step)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()

    def optimizer_step(self, loss: torch.Tensor, update_policy: bool = True, weight: float = 1.0) -> None:
        """Backward, clip policy and critic apart (a large critic gradient must not shrink the policy's
        step), update. ``weight``: what ``loss`` averages over on this rank (tokens or rows); under
        several processes it makes the all-reduced gradient that of the global mini-batch's loss."""
        scale, finite = global_loss_scale(self.accelerator, weight, bool(torch.isfinite(loss)))
        if not finite:
            raise RlhfkitError(
                f"step {self.step + 1}: the loss turned NaN/inf ({float(loss)}); "
                "lower --learning-rate or strengthen the KL term, then --resume from the last checkpoint"
            )
        self.accelerator.backward(loss * scale if scale != 1.0 else loss)
        if update_policy:
            self.accelerator.clip_grad_norm_(self.policy_params, self.cfg.max_grad_norm)
        if self.value_params:
            self.accelerator.clip_grad_norm_(self.value_params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    # -- the step's end: log, monitor, checkpoint, stop ------------------------------------------

    @contextmanager
    def running(self) -> Iterator[None]:
        """The loop's frame: the metrics log and the progress bar open, closed however the loop ends."""
        self.rows = read_metrics(self.out)
        self.active = {a.kind for a in self._alerts(self.rows)}
        self.best = read_best(self.out)
        if self.best is not None and self.best["step"] > self.step:  # saved after the checkpoint resumed from
            if self.main:
                shutil.rmtree(self.out / "best", ignore_errors=True)
            self.best = None
        self.stop_reason = f"reached max_steps={self.cfg.max_steps}"
        self.hacked = False
        self.last: dict[str, Any] = {}
        progress = progress_bar(self.algo, disable=not self.main)
        with MetricsLog(self.out, self.algo) if self.main else nullcontext() as self.log, progress:
            self.progress = progress
            self.task = progress.add_task(self.algo, total=self.cfg.max_steps, completed=self.step, info="")
            yield

    def end_step(self, metrics: dict[str, Any], timing: dict[str, float], started: float) -> bool:
        """Count the step, run the monitor when due, log, checkpoint; True when the run must stop."""
        cfg = self.cfg
        self.step += 1
        row: dict[str, Any] = {"step": self.step, **metrics, **timing}
        row["seconds"] = time.perf_counter() - started
        if cfg.monitor_judge and (self.step == 1 or self.step % cfg.monitor_every == 0 or self.step == cfg.max_steps):
            # Rank 0 samples the monitor's batch (with --fsdp every rank takes part: the layers gather
            # their shards); every rank gets rank 0's numbers, which the stop rules read.
            monitored: dict[str, float] = {}
            if self.monitor is not None:
                t0 = time.perf_counter()
                params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 1.0)
                with root_gathered(self.core):
                    monitored = self.monitor.run(self.core.trunk, params, cfg.batch_size, cfg.seed)
                monitored["time_monitor"] = time.perf_counter() - t0
            row.update(from_main(self.accelerator, monitored))
            row["seconds"] += row["time_monitor"]
            if self.best is None or row["monitor_score"] > self.best["monitor_score"]:
                self.best = {"step": self.step, "monitor_score": row["monitor_score"]}
                weights = self.trainable_weights()
                if self.main:
                    save_best(self.out, weights, self.best)
        self.rows.append(row)
        alerts = self._alerts(self.rows)
        new = [a for a in alerts if a.kind not in self.active]
        self.active = {a.kind for a in alerts}
        if alerts:
            row["alerts"] = sorted(self.active)
        if self.main:
            self.log.write(row)
        self.history = [*self.history, row["reward_mean"]][-cfg.threshold_window :]
        self.progress.update(
            self.task,
            completed=self.step,
            info=f"reward {row['reward_mean']:+.3f} kl {row['kl']:.3f} {row['seconds']:.1f}s/step",
        )
        self.last = row
        for alert in new if self.main else []:
            console.print(f"[yellow]reward-hacking alert at step {alert.step}: {alert.message}[/yellow]")
        if new and cfg.stop_on_hacking:
            self.hacked = True
            self.stop_reason = f"--stop-on-hacking: {new[0].kind} at step {self.step}"
            return True
        if not math.isfinite(row["kl"]):
            raise RlhfkitError(
                f"step {self.step}: KL turned NaN/inf; --resume from the last checkpoint with a lower learning rate"
            )
        if row["kl"] > cfg.max_kl:
            self.stop_reason = (
                f"KL {row['kl']:.2f} passed --max-kl {cfg.max_kl}: the policy drifted too far "
                "(earlier weights are in checkpoints/)"
            )
            if self.main:
                console.print(f"[yellow]stopping: {self.stop_reason}[/yellow]")
            return True
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save_checkpoint()
        moving = sum(self.history) / len(self.history)
        if (
            cfg.reward_threshold is not None
            and len(self.history) >= cfg.threshold_window
            and moving >= cfg.reward_threshold
        ):
            self.stop_reason = f"moving-average reward {moving:.3f} reached --reward-threshold"
            return True
        return self.step >= cfg.max_steps

    def _alerts(self, rows: list[dict[str, Any]]) -> list[Alert]:
        cfg = self.cfg
        return detect(
            rows,
            cfg.hacking_window,
            cfg.monitor_drop,
            cfg.length_ratio,
            cfg.kl_alert,
            cfg.min_distinct_2,
            cfg.distinct_2_ratio,
        )

    # -- checkpoints ------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """The algorithm's own state to checkpoint (JSON): its KL controller, when it has one."""
        return {"kl_controller": self.kl_ctl.state_dict()} if self.kl_ctl is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.kl_ctl is not None:
            self.kl_ctl.load_state_dict(state["kl_controller"])

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights whole (sharded ones gathered: every rank calls; rank 0 gets them)."""
        return full_state(self.core, {name for name, p in self.core.named_parameters() if p.requires_grad})

    def save_checkpoint(self) -> None:
        """Rank 0 writes the weights and optimizer (whole: the same on every rank, or gathered from the
        shards) and every rank's random state."""
        rngs = all_rng_states(self.accelerator, rng_state())
        weights = self.trainable_weights()
        optimizer = optimizer_state(self.core, self.optimizer)
        if self.main:
            save_checkpoint(
                self.out,
                self.step,
                weights,
                {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()},
                {"prompt_stream": self.stream.state_dict(), "reward_history": self.history, **self.extra_state()},
                self.cfg.keep_checkpoints,
                rngs,
            )
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, folder: Path) -> None:
        acc = self.accelerator
        if getattr(acc.state, "deepspeed_plugin", None) is not None:
            raise RlhfkitError(
                f"{folder}: resuming under DeepSpeed is not supported (each rank holds part of the optimizer "
                "state, and checkpoints keep rank 0's); resume with torchrun (DDP) or --fsdp"
            )
        trainable, torch_state, state = load_checkpoint(
            folder, trainable_state(self.core), acc.process_index, acc.num_processes
        )
        load_full_state(self.core, trainable)
        load_optimizer_state(self.core, self.optimizer, torch_state["optimizer"])
        self.scheduler.load_state_dict(torch_state["scheduler"])
        self.step = state["step"]
        self.stream = PromptStream(len(self.records), self.cfg.seed, **state["prompt_stream"])
        self.history = list(state["reward_history"])
        self.load_extra_state(state)

    def resume_if_asked(self) -> None:
        """On ``--resume``: continue from the last checkpoint, dropping the log rows written after it."""
        if not self.cfg.resume:
            return
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self.accelerator.wait_for_everyone()  # every rank has read the run before rank 0 rewrites its log
        if self.main:
            truncate_metrics(self.out, self.step)
            if checkpoint is not None:
                console.print(f"resuming {self.out} from step {self.step} ({checkpoint.name})")
        self.accelerator.wait_for_everyone()

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Checkpoint the last step, save the final weights and the model card; the run's summary."""
        if latest_checkpoint(self.out) != self.out / "checkpoints" / f"step-{self.step:06d}":
            self.save_checkpoint()
        keys = ("reward_mean", "kl", "kl_coef", "entropy", "response_length", "eos_rate", "seconds")
        summary: dict[str, Any] = {
            "steps": self.step,
            "stop": self.stop_reason,
            **{k: self.last[k] for k in keys if k in self.last},
        }
        if self.cfg.monitor_judge:
            summary["monitor_score"] = next(
                (r["monitor_score"] for r in reversed(self.rows) if "monitor_score" in r), None
            )
        if self.active:
            summary["alerts"] = ", ".join(sorted(self.active))
        if self.hacked and self.best is not None:
            # The checkpoint above holds the last step (to resume from); the final adapter is the best one.
            load_full_state(self.core, load_best(self.out))
            summary["final_weights"] = f"step {self.best['step']} (best monitor score {self.best['monitor_score']:.4f})"
        self.save_final(summary)
        self.accelerator.wait_for_everyone()
        return summary

    def save_final(self, summary: dict[str, Any]) -> None:
        """The final weights and the model card (rank 0; sharded weights are gathered first, by every rank)."""
        core, cfg = self.core, self.cfg
        whole = full_state(core) if is_sharded(core) else None
        if not self.main:
            return

        def part(prefix: str) -> dict[str, Any]:  # a sub-module's whole tensors, as save_pretrained takes them
            if whole is None:
                return {}
            return {"state_dict": {k.removeprefix(prefix): v for k, v in whole.items() if k.startswith(prefix)}}

        if self.critic:
            assert core.value_head is not None
            head = part("value_head.").get("state_dict") or core.value_head.state_dict()
            save_file({k: v.contiguous() for k, v in head.items()}, self.out / "value_head.safetensors")
            core.value_trunk.save_pretrained(self.out / "value", selected_adapters=[VALUE], **part("value_trunk."))
        if cfg.full:
            core.trunk.save_pretrained(self.out / "model", **part("trunk."))
            self.tokenizer.save_pretrained(self.out / "model")
        else:
            core.trunk.save_pretrained(self.out / "adapter", selected_adapters=[POLICY])
        kind = (
            "full fine-tune" if cfg.full else f"LoRA r={cfg.lora_r} on the top {cfg.trainable_layers or 'all'} layers"
        )
        files = "`adapter/` (peft) or `model/`, " + (
            "the critic (`value/` adapter and `value_head.safetensors`), " if self.critic else ""
        )
        write_model_card(
            self.out,
            f"{self.algo.upper()} policy ({cfg.policy})",
            f"Trained by `rlhf {self.algo}` (rlhfkit): {self.card_method()}.",
            [
                f"base model: `{cfg.policy}` ({kind})",
                f"reward: `{cfg.reward}`",
                f"prompts: `{cfg.prompts}`",
                f"steps: {self.step} x {cfg.batch_size} prompts x {self.group_size} completions, "
                f"learning rate {cfg.learning_rate}, {self.card_settings()}",
            ],
            summary,
            "last step",
            f"Files: {files}`metrics.jsonl`, `checkpoints/`.",
        )

    def card_method(self) -> str:
        return "online RL against a reward with a KL penalty to the base model"

    def card_settings(self) -> str:
        if self.kl_ctl is None:
            return ""
        target = self.kl_ctl.target
        return f"KL coef {self.kl_ctl.floor}" + (f" (adaptive, target {target})" if target else "")


def run_online(trainer_class: type[OnlineTrainer], cfg: RLConfig) -> dict[str, Any]:
    """Start a run, or continue one with ``cfg.resume``; returns the summary of the last step."""
    if not cfg.resume and cfg.max_steps is None:
        cfg.max_steps = DEFAULT_MAX_STEPS
    accelerator = make_accelerator(trainer_class.critic)
    cfg = open_run(cfg, required=("reward", "prompts", "out"), write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    trainer = trainer_class(cfg, accelerator=accelerator)  # type: ignore[call-arg]
    trainer.resume_if_asked()
    return trainer.train()  # type: ignore[attr-defined]

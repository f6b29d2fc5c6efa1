"""PPO fine-tuning of a policy against a reward, with a KL penalty to the frozen reference.

Recipe features:

- One frozen base model serves every role (LoRA mode, the default): the policy is the ``default``
  LoRA adapter on the top ``trainable_layers`` layers, the reference is the same base with the
  adapters disabled, the critic is its own ``value`` LoRA adapter plus a scalar head (so the value
  loss never moves the policy), and a reward model trained on the same backbone is one more frozen
  adapter (``reward``), from which the critic starts. The frozen lower layers run once per rollout;
  every role and every PPO epoch reuses their output. ``full`` fine-tunes every weight and keeps a
  frozen reference copy, which carries the critic's adapter.
- Rewards: a reward-model directory (scores normalised with the statistics saved by
  ``rlhf reward train``, pooled as it was trained), ``judge:NAME`` or ``module:function``. The score
  goes on the last response token, a per-token KL penalty (k1 or k3) on every token; responses cut at
  ``max_new_tokens`` without EOS get ``missing_eos_penalty`` (replace or subtract: the "EOS trick").
  A batch whose scores are all equal teaches nothing: its policy update is skipped, with a warning.
- GAE (gamma, lambda), advantages whitened over the batch, clipped policy ratio and clipped value
  loss, several PPO epochs over shuffled mini-batches (ended early past ``target_approx_kl``),
  gradient clipping (policy and critic apart), dropout off, an optional critic warm-up, and an
  adaptive KL controller (``target_kl``, horizon in steps) or a fixed coefficient.
- Log-probabilities over response tokens only, at the sampling temperature, with the same padding in
  rollout and training.
- Stops at ``max_steps``, at a moving-average reward of ``reward_threshold``, or with a clear message
  when a loss or the KL turns NaN or the KL passes ``max_kl``. Checkpoints every ``save_every``
  steps hold the trainable weights, optimizer, scheduler, KL controller, data position and every
  RNG state: ``rlhf ppo --resume RUN_DIR`` continues and reproduces a straight run's metrics.

Limits: one process is what is tested (the loop is written on ``accelerate`` so that DDP can come
later); sampling is plain temperature sampling (top-p would make the rollout distribution differ
from the one PPO scores).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.config import REQUIRED, load_yaml_config, option, save_config
from rlhfkit.console import progress_bar
from rlhfkit.data import Prompt, PromptRecord, load_prompts, prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, encode_prompts, left_pad, sample_batch
from rlhfkit.judges import Judge, distinct_n, load_judge
from rlhfkit.models import (
    DEFAULT_MODEL,
    final_hidden,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    lower_hidden,
    num_layers,
    trainable_state,
    upper_hidden,
)
from rlhfkit.ppo.core import (
    KLController,
    apply_eos_penalty,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from rlhfkit.ppo.monitor import Alert, detect
from rlhfkit.reward import (
    RewardModel,
    RewardModelDir,
    load_reward_model,
    read_reward_dir,
    reward_scores,
    score_texts,
)

console = Console(stderr=True)
POLICY = "default"
VALUE = "value"
REWARD = "reward"
DEFAULT_MAX_STEPS = 100


@dataclass
class PPOConfig:
    """Options of ``rlhf ppo``."""

    reward: str = option(REQUIRED, "Reward: a reward-model directory, judge:NAME or module:function.")
    prompts: str = option(REQUIRED, "Prompt file (.jsonl/.json/.parquet) or builtin:NAME.")
    out: str = option(REQUIRED, "Run directory to create.")
    policy: str = option(DEFAULT_MODEL, "Policy model: smollm2-135m, tiny-random, a model directory or org/name.")
    resume: str = option("", "Continue the run in this directory from its last checkpoint.")
    max_steps: int | None = option(
        None, "PPO steps (one rollout batch each) in total; default 100, on --resume the run's own."
    )
    batch_size: int = option(16, "Prompts per step (rollout batch).")
    mini_batch_size: int = option(8, "Rollouts per gradient step.")
    ppo_epochs: int = option(4, "Passes over each rollout batch.")
    target_approx_kl: float | None = option(
        None, "Stop a step's PPO epochs once a mini-batch's approx KL(old || new) passes this (unset = run them all)."
    )
    critic_warmup_steps: int = option(0, "First N steps update the critic only (the policy waits for sane values).")
    max_new_tokens: int = option(48, "Longest response in tokens.")
    max_prompt_tokens: int = option(192, "Longest formatted prompt in tokens (cut from the left).")
    temperature: float = option(0.7, "Sampling temperature, also used for the log-probabilities.")
    learning_rate: float = option(1e-4, "AdamW learning rate.")
    lr_schedule: str = option("constant", "constant, or linear (decays to 0 at max_steps).")
    kl_coef: float = option(0.05, "KL penalty coefficient (initial value with --target-kl).")
    target_kl: float | None = option(
        None, "Adaptive KL controller target (nats per sequence); unset = fixed coefficient."
    )
    kl_horizon: float = option(
        5.0, "Adaptive KL controller horizon in steps: the coefficient moves by up to a factor e^(1/horizon) a step."
    )
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward: k1 (log ratio) or k3.")
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
    whiten_rewards: bool = option(False, "Whiten the per-token rewards over the batch before GAE.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    clip_range: float = option(0.2, "Policy ratio clip.")
    clip_range_value: float = option(0.2, "Value clip.")
    vf_coef: float = option(0.1, "Value loss coefficient.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    full: bool = option(False, "Fine-tune every weight (keeps a frozen reference copy) instead of LoRA.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    trainable_layers: int = option(
        4, "LoRA on the top N layers only; the frozen ones below run once per rollout (0 = all)."
    )
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

    def __post_init__(self) -> None:
        checks = {
            "max_steps must be >= 1": self.max_steps is None or self.max_steps >= 1,
            "batch_size must be >= 1": self.batch_size >= 1,
            "mini_batch_size must be in [1, batch_size]": 1 <= self.mini_batch_size <= self.batch_size,
            "ppo_epochs must be >= 1": self.ppo_epochs >= 1,
            "temperature must be > 0 (PPO needs a sampling distribution)": self.temperature > 0,
            "kl_estimator must be k1 or k3": self.kl_estimator in ("k1", "k3"),
            "lr_schedule must be constant or linear": self.lr_schedule in ("constant", "linear"),
            "target_kl must be > 0": self.target_kl is None or self.target_kl > 0,
            "trainable_layers must be >= 0": self.trainable_layers >= 0,
            "max_new_tokens must be >= 1": self.max_new_tokens >= 1,
            "max_prompt_tokens must be >= 1": self.max_prompt_tokens >= 1,
            "lora_r must be >= 1 (or use --full)": self.full or self.lora_r >= 1,
            "kl_horizon must be >= 1 (steps)": self.kl_horizon >= 1,
            "eos_penalty_mode must be replace or subtract": self.eos_penalty_mode in ("replace", "subtract"),
            "target_approx_kl must be > 0": self.target_approx_kl is None or self.target_approx_kl > 0,
            "critic_warmup_steps must be >= 0": self.critic_warmup_steps >= 0,
            "learning_rate must be > 0": self.learning_rate > 0,
            "save_every must be >= 0": self.save_every >= 0,
            "keep_checkpoints must be >= 1": self.keep_checkpoints >= 1,
            "--monitor-judge needs --monitor-prompts": not self.monitor_judge or bool(self.monitor_prompts),
            "monitor_every and monitor_num_prompts must be >= 1": self.monitor_every >= 1
            and self.monitor_num_prompts >= 1,
            "hacking_window must be >= 2": self.hacking_window >= 2,
            "length_ratio must be > 1": self.length_ratio > 1,
        }
        failed = [text for text, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))


# ----------------------------------------------------------------------------------------------
# Models of every role


class PolicyAndValue(nn.Module):
    """The policy, the value function and the reference on one frozen base, with no shared trainable weight.

    LoRA mode: ``trunk`` is one peft model carrying the policy adapter (``default``), the value
    adapter (``value``) and, when the reward model shares the base, the frozen ``reward`` adapter;
    the reference is ``trunk`` with every adapter off. The value function is its own adapter plus
    ``value_head``: value-loss gradients never reach the policy's weights (a value head on the
    policy's trunk let the critic's loss alone move the policy 5 nats in 3 steps).
    ``--full`` mode: ``trunk`` is the whole trainable policy; ``value_trunk`` is the frozen reference
    copy carrying the ``value`` adapter (adapters off: the reference).

    Each role continues from the cached lower-layer output when its adapter starts at or above
    ``split``; otherwise it runs the whole decoder.
    """

    def __init__(
        self,
        trunk: nn.Module,
        value_head: nn.Linear,
        split: int,
        value_trunk: nn.Module | None = None,
        value_split: int | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.value_trunk = trunk if value_trunk is None else value_trunk
        self.value_head = value_head
        self.split = split
        self.value_split = split if value_split is None else value_split
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    def hidden(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, lower: torch.Tensor | None, first: int
    ) -> torch.Tensor:
        """Final hidden states of ``model`` as it is now; from ``lower`` when the active adapter allows."""
        if lower is None or first < self.split:
            return final_hidden(model, ids, mask)
        return upper_hidden(model, lower, mask, self.split)

    @contextmanager
    def adapter(self, name: str | None, model: nn.Module | None = None) -> Iterator[None]:
        """Run with adapter ``name`` active on ``model`` (default the policy trunk); ``None`` = adapters off.

        peft's ``set_adapter`` makes only the active adapter trainable; the policy and the value are
        both trained, so their flags are restored after every switch.
        """
        model = self.trunk if model is None else model
        if not hasattr(model, "peft_config"):
            yield
            return
        if name is None:
            with model.disable_adapter():
                yield
            return
        previous = model.active_adapter
        if name == previous:
            yield
            return
        model.set_adapter(name)
        self._restore_trainable()
        try:
            yield
        finally:
            model.set_adapter(previous)
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self._trainable:
            param.requires_grad_(True)

    def policy_logprobs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        query_len: int,
        temperature: float,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.hidden(self.trunk, ids, mask, lower, self.split)
        return response_logprobs(self.trunk, hidden, ids, query_len, temperature, with_entropy)

    def reference_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, lower: torch.Tensor | None, query_len: int, temperature: float
    ) -> torch.Tensor:
        model = self.value_trunk  # the policy trunk itself in LoRA mode; the frozen copy with --full
        with self.adapter(None, model):
            hidden = self.hidden(model, ids, mask, lower, self.split)
            return response_logprobs(model, hidden, ids, query_len, temperature)[0]

    def values(self, ids: torch.Tensor, mask: torch.Tensor, lower: torch.Tensor | None, query_len: int) -> torch.Tensor:
        """V(s_t) for every response position: the value adapter's hidden state before each token."""
        with self.adapter(VALUE, self.value_trunk):
            hidden = self.hidden(self.value_trunk, ids, mask, lower, self.value_split)
        return self.value_head(hidden[:, query_len - 1 : -1]).squeeze(-1)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        query_len: int,
        temperature: float,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Response log-probs, values and (optionally) entropies: what a PPO mini-batch needs."""
        logprobs, entropy = self.policy_logprobs(ids, mask, lower, query_len, temperature, with_entropy)
        return logprobs, self.values(ids, mask, lower, query_len), entropy


def _is_value_adapter(param_name: str) -> bool:
    """A LoRA weight of the value adapter (peft names them ``...lora_A.value.weight``)."""
    parts = param_name.split(".")
    return VALUE in parts and ("lora_A" in parts or "lora_B" in parts)


def response_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    query_len: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the response tokens ``ids[:, query_len:]`` (LM head on those positions only).

    The (rows x response x vocabulary) logits are the largest tensors of a PPO step. Without
    gradients (rollout, reference, evaluation) the rows go through the head a few at a time, so only
    a slice of them ever exists; with gradients the mini-batch is already small.
    """
    head = model.get_output_embeddings()
    states, targets = hidden[:, query_len - 1 : -1], ids[:, query_len:, None]
    if torch.is_grad_enabled():
        return _head_logprobs(head, states, targets, temperature, with_entropy)
    parts = [
        _head_logprobs(head, states[i : i + LOGIT_ROWS], targets[i : i + LOGIT_ROWS], temperature, with_entropy)
        for i in range(0, states.shape[0], LOGIT_ROWS)
    ]
    chosen = torch.cat([c for c, _ in parts])
    entropy = torch.cat([e for _, e in parts]) if with_entropy else None  # type: ignore[misc]
    return chosen, entropy


LOGIT_ROWS = 4
"""Rows per LM-head slice without gradients: 4 x 32 tokens x 49k vocabulary is 25 MB a tensor."""


def _head_logprobs(
    head: nn.Module, states: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(states)
    logits.div_(temperature)  # in place: a linear layer's backward never reads its output
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    chosen = logp.gather(-1, targets).squeeze(-1)
    entropy = entropy_from_logits(logp.detach()) if with_entropy else None
    return chosen, entropy


class RewardSource:
    """Scores a rollout batch: a judge on texts, a separate reward model, or the shared ``reward`` adapter."""

    def __init__(self, spec: str, policy_name: str, full: bool) -> None:
        self.spec = spec
        self.judge: Judge | None = None
        self.info: RewardModelDir | None = None
        self.model: RewardModel | None = None  # a reward model on its own backbone
        self.tokenizer = None
        self.adapter_dir: Path | None = None
        self.adapter_split = 0
        if spec.startswith("judge:"):
            self.judge = load_judge(spec.removeprefix("judge:"))
            return
        if not Path(spec).is_dir():
            if ":" not in spec:
                raise RlhfkitError(f"--reward {spec!r}: not a reward-model directory, judge:NAME or module:function")
            self.judge = load_judge(spec)
            return
        self.info = read_reward_dir(spec)
        if self.shares_base(policy_name, full):
            if self.info.kind == "adapter":
                self.adapter_dir = self.info.folder / "adapter"
                adapter_cfg = json.loads((self.adapter_dir / "adapter_config.json").read_text())
                layers = adapter_cfg.get("layers_to_transform")
                self.adapter_split = min(layers) if layers else 0
            else:  # a linear probe on the frozen base: read with every adapter disabled
                self.adapter_split = 10**9
            self.info.head.requires_grad_(False)
        else:
            self.model, self.tokenizer, _ = load_reward_model(spec)
            self.model.requires_grad_(False)

    def shares_base(self, policy_name: str, full: bool) -> bool:
        return self.info is not None and self.info.kind != "full" and self.info.base == policy_name and not full

    def value_head_init(self, normalize: bool) -> nn.Linear | None:
        """The reward head rescaled to the normalised reward PPO sees, when the backbone is shared."""
        if self.info is None or self.model is not None:
            return None
        head = nn.Linear(self.info.head.in_features, 1)
        scale, shift = (1 / self.info.score_std, self.info.score_mean) if normalize else (1.0, 0.0)
        with torch.no_grad():
            head.weight.copy_(self.info.head.weight * scale)
            head.bias.copy_((self.info.head.bias - shift) * scale)
        return head

    @torch.no_grad()
    def score(
        self,
        core: PolicyAndValue,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        query_len: int,
        prompts: Sequence[str],
        texts: Sequence[str],
    ) -> torch.Tensor:
        """Raw scores; ``ids``/``mask``/``lower`` cover ``query`` (left-padded to ``query_len``)
        ``+ response + EOS``, pooled as the reward model was trained (last token, or the response)."""
        if self.judge is not None:
            return torch.tensor(self.judge([prompt_text(p) for p in prompts], list(texts)), dtype=torch.float32)
        if self.model is not None:  # its own backbone and tokenizer: score the texts
            return torch.tensor(score_texts(self.model, self.tokenizer, prompts, texts), dtype=torch.float32)
        with core.adapter(REWARD if self.adapter_dir is not None else None):
            hidden = core.hidden(core.trunk, ids, mask, lower, self.adapter_split)
        completion_start = torch.full((ids.shape[0],), query_len, dtype=torch.long)
        return reward_scores(self.info.head, hidden, mask, completion_start, self.info.pooling)

    def normalise(self, scores: torch.Tensor, enabled: bool) -> torch.Tensor:
        if self.info is None or not enabled:
            return scores
        return self.info.normalise(scores)


# ----------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, Lq + Lr) query (left-padded) + response (right-padded)
    mask: torch.Tensor
    query_len: int
    response_mask: torch.Tensor  # (B, Lr) float, 1 up to and including EOS
    lower: torch.Tensor | None
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # normalised, before the EOS penalty
    penalized: torch.Tensor  # after the EOS penalty: what PPO optimises (with the KL penalty)
    ended: torch.Tensor
    entropy: torch.Tensor
    texts: list[str]
    prompts: list[Prompt]


class PromptStream:
    """Prompts in a seeded shuffled order per epoch; the position is all a checkpoint needs."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index

    def _order(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        order = self._order()
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


# ----------------------------------------------------------------------------------------------
# The trainer


class PPOTrainer:
    """Owns the models, optimizer and run directory; ``train`` runs the loop."""

    def __init__(self, cfg: PPOConfig, accelerator: Any = None) -> None:
        from accelerate import Accelerator

        if cfg.max_steps is None:
            cfg.max_steps = DEFAULT_MAX_STEPS
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator or Accelerator()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        records = load_prompts(cfg.prompts)
        self.records: list[PromptRecord] = records
        self.tokenizer = load_tokenizer(cfg.policy)
        self.queries = [
            ids[-cfg.max_prompt_tokens :] for ids in encode_prompts(self.tokenizer, [r.prompt for r in records])
        ]
        self.stream = PromptStream(len(records), cfg.seed)

        from peft import get_peft_model

        base = load_causal_lm(cfg.policy)
        n_layers = num_layers(base)
        self.reward = RewardSource(cfg.reward, cfg.policy, cfg.full)
        trainable = n_layers if cfg.trainable_layers == 0 else min(cfg.trainable_layers, n_layers)
        adapter_config = lora_config(base, cfg.lora_r, cfg.lora_alpha, first_layer=n_layers - trainable)
        if cfg.full:
            self.split = value_split = 0
            base.requires_grad_(True)
            trunk = base
            # The frozen reference copy carries the value adapter; with adapters off it is the reference.
            reference = load_causal_lm(cfg.policy).requires_grad_(False)
            value_trunk = get_peft_model(reference, adapter_config, adapter_name=VALUE)
        else:
            self.split = value_split = n_layers - trainable
            base.requires_grad_(False)
            trunk = value_trunk = get_peft_model(base, adapter_config)  # the policy adapter: POLICY
            if self.reward.adapter_dir is not None:
                trunk.load_adapter(self.reward.adapter_dir, adapter_name=REWARD, is_trainable=False)
                # The critic starts as the reward model: its adapter and (rescaled) head.
                trunk.load_adapter(self.reward.adapter_dir, adapter_name=VALUE, is_trainable=True)
                value_split = self.reward.adapter_split
            else:
                trunk.add_adapter(VALUE, adapter_config)
            trunk.set_adapter(POLICY)
            trunk.set_requires_grad([POLICY, VALUE], True)
        value_head = self.reward.value_head_init(cfg.normalize_reward)
        # Without a reward head to start from, the critic predicts the first batch's mean score
        # (weights 0, bias set at the first rollout) instead of random noise.
        self.value_bias_from_scores = value_head is None
        if value_head is None:
            value_head = nn.Linear(base.config.hidden_size, 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        value_head.requires_grad_(True)
        self.model = PolicyAndValue(trunk, value_head, self.split, value_trunk, value_split)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.value_params = [p for name, p in named if name.startswith("value_head.") or _is_value_adapter(name)]
        value_ids = {id(p) for p in self.value_params}
        self.policy_params = [p for _, p in named if id(p) not in value_ids]
        # No weight decay (as TRL and CleanRL): it would pull LoRA weights to 0 on steps with no gradient.
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params}, {"params": self.value_params}],
            lr=cfg.learning_rate,
            eps=1e-5,
            weight_decay=0.0,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.step = 0
        self._warned_no_signal = False
        self.history: list[float] = []
        self.monitor_judge: Judge | None = None
        if cfg.monitor_judge:
            self.monitor_judge = load_judge(cfg.monitor_judge)
            held = load_prompts(cfg.monitor_prompts)[: cfg.monitor_num_prompts]
            self.monitor_texts = [prompt_text(r.prompt) for r in held]
            self.monitor_queries = [
                ids[-cfg.max_prompt_tokens :] for ids in encode_prompts(self.tokenizer, [r.prompt for r in held])
            ]

    def _lr_factor(self, step: int) -> float:
        if self.cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - step / self.cfg.max_steps)
        return 1.0

    @property
    def core(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    # -- rollout -------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompt_idx: Sequence[int]) -> tuple[Rollout, dict[str, float]]:
        cfg, tok, core = self.cfg, self.tokenizer, self.core
        eos, pad = tok.eos_token_id, tok.pad_token_id
        t0 = time.perf_counter()
        query_ids, query_mask = left_pad([self.queries[i] for i in prompt_idx], pad)
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 1.0)
        core.trunk.eval()
        batch = sample_batch(core.trunk, tok, query_ids, query_mask, params)
        responses, response_mask, ended, texts = batch.responses, batch.mask, batch.ended, batch.texts
        t1 = time.perf_counter()

        # One extra column holds an EOS for responses cut without one: the reward model always
        # reads a sequence ending in EOS. Causal attention leaves earlier positions unchanged.
        extra = torch.where(ended, pad, eos)[:, None]
        ids_ext = torch.cat([query_ids, responses, extra], dim=1)
        mask_ext = torch.cat([query_mask, response_mask, (~ended).long()[:, None]], dim=1)
        lower_ext = lower_hidden(core.trunk, ids_ext, mask_ext, self.split) if self.split > 0 else None
        ids, mask = ids_ext[:, :-1], mask_ext[:, :-1]
        lower = lower_ext[:, :-1] if lower_ext is not None else None
        qlen = query_ids.shape[1]

        logprobs, entropy = core.policy_logprobs(ids, mask, lower, qlen, cfg.temperature, with_entropy=True)
        values = core.values(ids, mask, lower, qlen)
        ref_logprobs = core.reference_logprobs(ids, mask, lower, qlen, cfg.temperature)

        prompts = [self.records[i].prompt for i in prompt_idx]
        raw = self.reward.score(core, ids_ext, mask_ext, lower_ext, qlen, prompts, texts)
        scores = self.reward.normalise(raw.float(), cfg.normalize_reward)
        penalized = apply_eos_penalty(scores, ended, cfg.missing_eos_penalty, cfg.eos_penalty_mode)
        if self.value_bias_from_scores and self.step == 0:
            core.value_head.bias.fill_(float(penalized.mean()))  # weights are 0: every value is the bias
            values = core.values(ids, mask, lower, qlen)
        t2 = time.perf_counter()
        rollout = Rollout(
            ids=ids,
            mask=mask,
            query_len=qlen,
            response_mask=response_mask.float(),
            lower=lower,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            penalized=penalized,
            ended=ended,
            entropy=entropy,
            texts=texts,
            prompts=prompts,
        )
        return rollout, {"time_generate": t1 - t0, "time_score": t2 - t1}

    # -- one PPO step ---------------------------------------------------------------------------

    def ppo_step(self, r: Rollout) -> dict[str, float]:
        cfg = self.cfg
        rmask = r.response_mask
        n = r.ids.shape[0]
        # 1. Per-token rewards: -kl_coef * KL on every token, the (EOS-penalised) score on the last.
        kl = kl_per_token(r.logprobs, r.ref_logprobs, cfg.kl_estimator) * rmask
        rewards = token_rewards(r.penalized, kl, self.kl_ctl.value, rmask)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, rmask, shift_mean=False)
        # 2. Advantages (GAE) against the critic's values, whitened over the batch.
        advantages, returns = gae(rewards, r.values, rmask, cfg.gamma, cfg.lam)
        advantage_std_raw = float(masked_var(advantages, rmask).sqrt())
        advantages = whiten(advantages, rmask)
        # 3. Does the policy learn this step? Not while the critic warms up, and not from scores that
        #    are all equal: whitened advantages would then follow the critic's noise.
        no_signal = n > 1 and float(r.penalized.std()) < 1e-6
        if no_signal:
            self._warn_no_signal(r)
        update_policy = self.step >= cfg.critic_warmup_steps and not no_signal
        learning_rate = self.scheduler.get_last_lr()[0]

        # 4. PPO epochs over shuffled mini-batches (the model stays in eval mode: dropout off).
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl")
        }
        updates, stop_early = 0, False
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + self.step)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.mini_batch_size):
                mb = order[start : start + cfg.mini_batch_size]
                lower = r.lower[mb] if r.lower is not None else None
                if update_policy:
                    logprobs, values, _ = self.model(r.ids[mb], r.mask[mb], lower, r.query_len, cfg.temperature)
                    pg_loss, clip_frac, approx_kl = policy_loss(
                        logprobs, r.logprobs[mb], advantages[mb], rmask[mb], cfg.clip_range
                    )
                else:  # value updates only
                    values = self.core.values(r.ids[mb], r.mask[mb], lower, r.query_len)
                    pg_loss = clip_frac = approx_kl = torch.zeros(())
                vf_loss, vf_clip = value_loss(values, r.values[mb], returns[mb], rmask[mb], cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise RlhfkitError(
                        f"step {self.step + 1}: the loss turned NaN/inf "
                        f"(policy {float(pg_loss)}, value {float(vf_loss)}); "
                        "lower --learning-rate or raise --kl-coef, then --resume from the last checkpoint"
                    )
                self.accelerator.backward(loss)
                # Clipped apart: a large critic gradient must not shrink the policy's step.
                if update_policy:
                    self.accelerator.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)
                self.accelerator.clip_grad_norm_(self.value_params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                updates += 1
                for key, value in (
                    ("policy_loss", pg_loss),
                    ("value_loss", vf_loss),
                    ("clip_frac", clip_frac),
                    ("value_clip_frac", vf_clip),
                    ("approx_kl", approx_kl),
                ):
                    stats[key].append(float(value.detach()))
                # 5. Early stop inside the step once the policy moved far from the one that sampled.
                if update_policy and cfg.target_approx_kl is not None and float(approx_kl) > cfg.target_approx_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        self.scheduler.step()

        seq_kl = kl.sum(-1)
        lengths = rmask.sum(-1)
        metrics = {
            "reward_mean": float(r.scores.mean()),
            "reward_std": float(r.scores.std()) if n > 1 else 0.0,
            "score_penalized_mean": float(r.penalized.mean()),
            "score_penalized_std": float(r.penalized.std()) if n > 1 else 0.0,
            "kl": float(seq_kl.mean()),
            "kl_coef": self.kl_ctl.value,
            "rlhf_reward": float((r.penalized - self.kl_ctl.value * seq_kl).mean()),
            "entropy": float(masked_mean(r.entropy, rmask)),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "updates": updates,
            "policy_updated": int(update_policy),
            "response_length": float(lengths.mean()),
            "eos_rate": float(r.ended.float().mean()),
            "distinct_2": distinct_n(r.texts, 2),
            "advantage_std_raw": advantage_std_raw,
            "value_mean": float(masked_mean(r.values, rmask)),
            "explained_variance": explained_variance(r.values, returns, rmask),
            "learning_rate": learning_rate,
        }
        self.kl_ctl.update(metrics["kl"])
        return metrics

    def _warn_no_signal(self, r: Rollout) -> None:
        """Say once, clearly, why a step taught nothing and what to change."""
        if self._warned_no_signal:
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
            cause = f"the reward gave every response of the batch the same score ({value:g})"
            fix = "check the reward (a judge or function that returns a constant?)"
        console.print(
            f"[yellow]warning: step {self.step + 1}: the scores carry no signal: {cause}. "
            f"The policy update is skipped on such steps (the critic still learns). Fix: {fix}.[/yellow]"
        )

    # -- reward-hacking monitor ------------------------------------------------------------------

    @torch.no_grad()
    def run_monitor(self) -> dict[str, float]:
        """Score the fixed held-out batch with the independent judge, with the same dice every time."""
        assert self.monitor_judge is not None
        cfg, tok, core = self.cfg, self.tokenizer, self.core
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 1.0)
        core.trunk.eval()
        texts: list[str] = []
        lengths: list[float] = []
        with torch.random.fork_rng():  # the training run's random stream stays untouched (resume)
            torch.manual_seed(cfg.seed + 1)
            for start in range(0, len(self.monitor_queries), cfg.batch_size):
                ids, mask = left_pad(self.monitor_queries[start : start + cfg.batch_size], tok.pad_token_id)
                batch = sample_batch(core.trunk, tok, ids, mask, params)
                texts += batch.texts
                lengths += batch.lengths.float().tolist()
        scores = self.monitor_judge(self.monitor_texts, texts)
        return {
            "monitor_score": sum(scores) / len(scores),
            "monitor_distinct_2": distinct_n(texts, 2),
            "monitor_length": sum(lengths) / len(lengths),
        }

    def _best(self) -> dict[str, Any] | None:
        info = self.out / "best" / "info.json"
        return json.loads(info.read_text()) if info.exists() else None

    def _save_best(self, score: float) -> None:
        """Keep the weights with the highest monitor score: what --stop-on-hacking falls back to."""
        folder = self.out / "best"
        tmp = folder.with_name("best.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(self.core), tmp / "trainable.safetensors")
        (tmp / "info.json").write_text(json.dumps({"step": self.step, "monitor_score": score}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

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

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints" / f"step-{self.step:06d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(self.core), tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(),
            },
            tmp / "state.pt",
        )
        state = {
            "step": self.step,
            "kl_controller": self.kl_ctl.state_dict(),
            "prompt_stream": self.stream.state_dict(),
            "reward_history": self.history,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        kept = sorted(p for p in (self.out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        state = load_file(folder / "trainable.safetensors")
        missing = set(trainable_state(self.core)) - set(state)
        if missing:
            raise RlhfkitError(f"{folder}: checkpoint lacks {sorted(missing)[:3]} (made with other settings?)")
        self.core.load_state_dict(state, strict=False)
        extra = torch.load(folder / "state.pt", weights_only=False)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        random.setstate(extra["python_rng"])
        np.random.set_state(extra["numpy_rng"])
        meta = json.loads((folder / "trainer_state.json").read_text())
        self.step = meta["step"]
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.stream = PromptStream(len(self.records), self.cfg.seed, **meta["prompt_stream"])
        self.history = list(meta["reward_history"])

    # -- outputs ----------------------------------------------------------------------------------

    def save_final(self, metrics: dict[str, float]) -> None:
        core = self.core
        save_file(
            {k: v.contiguous() for k, v in core.value_head.state_dict().items()},
            self.out / "value_head.safetensors",
        )
        core.value_trunk.save_pretrained(self.out / "value", selected_adapters=[VALUE])
        if self.cfg.full:
            core.trunk.save_pretrained(self.out / "model")
            self.tokenizer.save_pretrained(self.out / "model")
        else:
            core.trunk.save_pretrained(self.out / "adapter", selected_adapters=[POLICY])
        write_model_card(self.out, self.cfg, metrics, self.step)

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        log_path = self.out / "metrics.jsonl"
        writer = _tensorboard(self.out)
        last: dict[str, Any] = {}
        stop_reason = f"reached max_steps={cfg.max_steps}"
        rows = _read_log(log_path)
        active = {a.kind for a in self._alerts(rows)}
        best = self._best()
        if best is not None and best["step"] > self.step:  # saved after the checkpoint we resume from
            shutil.rmtree(self.out / "best")
            best = None
        hacked = False
        progress = progress_bar("ppo")
        with progress, log_path.open("a", encoding="utf-8") as log:
            task = progress.add_task("ppo", total=cfg.max_steps, completed=self.step, info="")
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                rollout, timing = self.rollout(self.stream.take(cfg.batch_size))
                t1 = time.perf_counter()
                metrics = self.ppo_step(rollout)
                self.step += 1
                row = {"step": self.step, **metrics, **timing, "time_train": time.perf_counter() - t1}
                row["seconds"] = time.perf_counter() - t0
                if self.monitor_judge is not None and (
                    self.step == 1 or self.step % cfg.monitor_every == 0 or self.step == cfg.max_steps
                ):
                    t2 = time.perf_counter()
                    row.update(self.run_monitor())
                    row["time_monitor"] = time.perf_counter() - t2
                    row["seconds"] += row["time_monitor"]
                    if best is None or row["monitor_score"] > best["monitor_score"]:
                        self._save_best(row["monitor_score"])
                        best = self._best()
                rows.append(row)
                alerts = self._alerts(rows)
                new = [a for a in alerts if a.kind not in active]
                active = {a.kind for a in alerts}
                if alerts:
                    row["alerts"] = sorted(active)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)):
                            writer.add_scalar(f"ppo/{key}", value, self.step)
                last = row
                self.history = ([*self.history, row["reward_mean"]])[-cfg.threshold_window :]
                progress.update(
                    task,
                    completed=self.step,
                    info=f"reward {row['reward_mean']:+.3f} kl {row['kl']:.3f} {row['seconds']:.1f}s/step",
                )
                for alert in new:
                    console.print(f"[yellow]reward-hacking alert at step {alert.step}: {alert.message}[/yellow]")
                if new and cfg.stop_on_hacking:
                    hacked = True
                    stop_reason = f"--stop-on-hacking: {new[0].kind} at step {self.step}"
                    break
                if not math.isfinite(row["kl"]):
                    raise RlhfkitError(
                        f"step {self.step}: KL turned NaN/inf; "
                        "--resume from the last checkpoint with a lower learning rate"
                    )
                if row["kl"] > cfg.max_kl:
                    stop_reason = (
                        f"KL {row['kl']:.2f} passed --max-kl {cfg.max_kl}: the policy drifted too far "
                        "(earlier weights are in checkpoints/)"
                    )
                    console.print(f"[yellow]stopping: {stop_reason}[/yellow]")
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                moving = sum(self.history) / len(self.history)
                if (
                    cfg.reward_threshold is not None
                    and len(self.history) >= cfg.threshold_window
                    and moving >= cfg.reward_threshold
                ):
                    stop_reason = f"moving-average reward {moving:.3f} reached --reward-threshold"
                    break
        if writer is not None:
            writer.close()
        if latest_checkpoint(self.out) != self.out / "checkpoints" / f"step-{self.step:06d}":
            self.save_checkpoint()
        summary = {
            "steps": self.step,
            "stop": stop_reason,
            **{
                k: last.get(k)
                for k in ("reward_mean", "kl", "kl_coef", "entropy", "response_length", "eos_rate", "seconds")
            },
        }
        if self.monitor_judge is not None:
            summary["monitor_score"] = next((r["monitor_score"] for r in reversed(rows) if "monitor_score" in r), None)
        if active:
            summary["alerts"] = ", ".join(sorted(active))
        if hacked and best is not None:
            # The checkpoint above holds the last step (to resume from); the final adapter is the best one.
            self.core.load_state_dict(load_file(self.out / "best" / "trainable.safetensors"), strict=False)
            summary["final_weights"] = f"step {best['step']} (best monitor score {best['monitor_score']:.4f})"
        self.save_final(summary)
        return summary


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def write_model_card(out: Path, cfg: PPOConfig, summary: dict, steps: int) -> None:
    kind = "full fine-tune" if cfg.full else f"LoRA r={cfg.lora_r} on the top {cfg.trainable_layers or 'all'} layers"
    lines = [
        f"# PPO policy ({cfg.policy})",
        "",
        "Trained by `rlhf ppo` (rlhfkit): PPO against a reward with a KL penalty to the base model.",
        "",
        f"- base model: `{cfg.policy}` ({kind})",
        f"- reward: `{cfg.reward}`",
        f"- prompts: `{cfg.prompts}`",
        f"- steps: {steps} x {cfg.batch_size} prompts, {cfg.ppo_epochs} PPO epochs, "
        f"learning rate {cfg.learning_rate}, "
        f"KL coef {cfg.kl_coef}{' (adaptive, target ' + str(cfg.target_kl) + ')' if cfg.target_kl else ''}",
        "",
        "| last step | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += [
        "",
        "Files: `adapter/` (peft) or `model/`, the critic (`value/` adapter and `value_head.safetensors`), "
        "`metrics.jsonl`, `checkpoints/`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return found[-1] if found else None


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Start a run, or continue one with ``resume``; returns the summary of the last step."""
    if cfg.resume:
        changed = [
            "--" + f.name.replace("_", "-")
            for f in fields(PPOConfig)
            if f.name not in ("resume", "max_steps") and getattr(cfg, f.name) != f.default
        ]
        if changed:
            raise RlhfkitError(
                "--resume continues with the run's own settings; only --max-steps may change "
                f"(got {', '.join(changed)})"
            )
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.yaml").exists():
            raise RlhfkitError(f"{run_dir}: not a PPO run directory (no config.yaml)")
        saved = load_yaml_config(PPOConfig, run_dir / "config.yaml")
        if cfg.max_steps is not None:
            saved["max_steps"] = cfg.max_steps
        saved["resume"] = str(run_dir)
        saved["out"] = str(run_dir)  # the run may have moved since it started
        try:
            cfg = PPOConfig(**saved)
        except (TypeError, ValueError) as exc:
            raise RlhfkitError(f"{run_dir / 'config.yaml'}: {exc}") from exc
        checkpoint = latest_checkpoint(run_dir)
        trainer = PPOTrainer(cfg)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            _truncate_log(run_dir / "metrics.jsonl", trainer.step)
            console.print(f"resuming {run_dir} from step {trainer.step} ({checkpoint.name})")
        else:
            _truncate_log(run_dir / "metrics.jsonl", 0)
        save_config(cfg, run_dir / "config.yaml")
    else:
        missing = [f"--{name}" for name in ("reward", "prompts", "out") if not getattr(cfg, name)]
        if missing:
            raise RlhfkitError(f"missing required option {', '.join(missing)} (or --resume RUN_DIR)")
        out = Path(cfg.out)
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
            raise RlhfkitError(f"{out}: already holds a run; continue it with --resume {out} or pick another --out")
        out.mkdir(parents=True, exist_ok=True)
        if cfg.max_steps is None:
            cfg.max_steps = DEFAULT_MAX_STEPS
        save_config(cfg, out / "config.yaml")
        trainer = PPOTrainer(cfg)
    summary = trainer.train()
    return summary


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (a killed run's partial tail)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                rows.append(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")

"""Every role of online RL on one frozen base: policy, reference, critic, reward; and response log-probs.

LoRA mode (the default): ``trunk`` is one peft model carrying the policy adapter (``default``), the
critic's adapter (``value``, PPO only) and, when the reward model shares the base, the frozen
``reward`` adapter; the reference is ``trunk`` with every adapter off. The critic has its own
adapter plus ``value_head``: value-loss gradients never reach the policy's weights (a value head on
the policy's trunk let the critic's loss alone move the policy 5 nats in 3 steps).
``--full`` mode: ``trunk`` is the whole trainable policy; ``value_trunk`` is a frozen reference copy
(carrying the ``value`` adapter when there is a critic).

The frozen layers below ``split`` run once per rollout (``lower_hidden``); every role and every
epoch continues from their output when its adapter starts at or above ``split``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhfkit.models import (
    build_trunk,
    checkpointed_layers,
    final_hidden,
    load_causal_lm,
    lora_config,
    num_layers,
    upper_hidden,
)
from rlhfkit.rl.losses import entropy_from_logprobs

POLICY = "default"
VALUE = "value"
REWARD = "reward"


class Roles(nn.Module):
    """Policy, reference and (optionally) critic on one frozen base, with no shared trainable weight."""

    def __init__(
        self,
        trunk: nn.Module,
        value_head: nn.Linear | None,
        split: int,
        value_trunk: nn.Module | None = None,
        value_split: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.value_trunk = trunk if value_trunk is None else value_trunk
        self.value_head = value_head
        self.split = split
        self.value_split = split if value_split is None else value_split
        self.gradient_checkpointing = gradient_checkpointing
        self.remember_trainable()

    def remember_trainable(self) -> None:
        """The parameters an adapter switch must leave trainable (again after FSDP replaced them)."""
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    def hidden(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        first: int,
        checkpointed: bool = False,
    ) -> torch.Tensor:
        """Final hidden states of ``model`` as it is now; from ``lower`` when the active adapter allows.

        ``checkpointed``: recompute layers ``first`` and up in backward. Only for the adapter that is
        active outside any ``adapter()`` switch (the policy's): a recompute runs at backward time,
        under whichever adapter is active then.
        """
        with checkpointed_layers(model, first) if checkpointed else nullcontext():
            if lower is None or first < self.split:
                return final_hidden(model, ids, mask)
            return upper_hidden(model, lower, mask, self.split)

    @contextmanager
    def adapter(self, name: str | None, model: nn.Module | None = None) -> Iterator[None]:
        """Run with adapter ``name`` active on ``model`` (default the policy trunk); ``None`` = adapters off.

        peft's ``set_adapter`` makes only the active adapter trainable; the policy and the critic
        are both trained, so their flags are restored after every switch.
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
        hidden = self.hidden(self.trunk, ids, mask, lower, self.split, self.gradient_checkpointing)
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
        assert self.value_head is not None, "this run has no critic"
        with self.adapter(VALUE, self.value_trunk):
            hidden = self.hidden(self.value_trunk, ids, mask, lower, self.value_split)
        states = hidden[:, query_len - 1 : -1]
        return self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1)  # fp32 head on bf16 weights

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        query_len: int,
        temperature: float,
        with_entropy: bool = False,
        with_values: bool = True,
        with_policy: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Response log-probs (unless ``with_policy`` is off: a critic-only step), values (with a critic)
        and entropies (if asked): what a mini-batch needs.

        Training steps call the module (not its methods), so a data-parallel wrapper sees the forward.
        """
        logprobs = entropy = None
        if with_policy:
            logprobs, entropy = self.policy_logprobs(ids, mask, lower, query_len, temperature, with_entropy)
        values = self.values(ids, mask, lower, query_len) if with_values else None
        return logprobs, values, entropy


def build_roles(
    policy: str,
    full: bool,
    lora_r: int,
    lora_alpha: int,
    trainable_layers: int,
    critic: bool,
    reward_adapter: str | None = None,
    reward_split: int = 0,
    value_head: nn.Linear | None = None,
    gradient_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Roles, bool]:
    """Load ``policy`` once and wire every role on it; returns ``(roles, value_bias_from_scores)``.

    ``reward_adapter``: a reward model's LoRA directory on the same base, loaded as the frozen
    ``reward`` adapter and, with a ``critic``, as the critic's starting point (with ``value_head``,
    the reward head rescaled). Without a head to start from, the critic's head is zero with its bias
    left to be set from the first batch's mean score (``value_bias_from_scores``), not random noise.
    """
    from peft import get_peft_model

    base = load_causal_lm(policy, dtype)
    n_layers = num_layers(base)
    trainable = n_layers if trainable_layers == 0 else min(trainable_layers, n_layers)
    adapter_config = lora_config(base, lora_r, lora_alpha, first_layer=n_layers - trainable)
    trunk, split = build_trunk(base, full, lora_r, lora_alpha, trainable_layers, adapter_name=POLICY)
    value_trunk, value_split = None, split
    if full:
        # The frozen reference copy (carrying the critic's adapter): adapters off, it is the reference.
        reference = load_causal_lm(policy, dtype).requires_grad_(False)
        value_trunk = get_peft_model(reference, adapter_config, adapter_name=VALUE) if critic else reference
    else:
        if reward_adapter is not None:
            trunk.load_adapter(reward_adapter, adapter_name=REWARD, is_trainable=False)
        if critic and reward_adapter is not None:
            # The critic starts as the reward model: its adapter and (rescaled) head.
            trunk.load_adapter(reward_adapter, adapter_name=VALUE, is_trainable=True)
            value_split = reward_split
        elif critic:
            trunk.add_adapter(VALUE, adapter_config)
        trunk.set_adapter(POLICY)
        trunk.set_requires_grad([POLICY, VALUE] if critic else [POLICY], True)
    bias_from_scores = False
    if critic:
        if value_head is None:
            value_head = nn.Linear(base.config.hidden_size, 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
            bias_from_scores = True
        value_head.requires_grad_(True)
    else:
        value_head = None
    roles = Roles(trunk, value_head, split, value_trunk, value_split, gradient_checkpointing)
    return roles, bias_from_scores


def is_value_param(param_name: str) -> bool:
    """The critic's weights: its head, or a LoRA weight of its adapter (``...lora_A.value.weight``)."""
    if param_name.startswith("value_head."):
        return True
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

    The (rows x response x vocabulary) logits are the largest tensors of a step (four of them live
    at once in a plain backward). The rows go through the head a slice at a time, so only one
    slice's logits ever exists; with gradients each slice is checkpointed: its backward recomputes
    the slice's logits (one more LM-head matmul) instead of keeping them from the forward.
    """
    head = model.get_output_embeddings()
    states, targets = hidden[:, query_len - 1 : -1], ids[:, query_len:, None]
    rows = max(1, LOGIT_TOKENS // max(1, targets.shape[1]))
    parts = []
    for i in range(0, states.shape[0], rows):
        args = (head, states[i : i + rows], targets[i : i + rows], temperature, with_entropy)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_head_logprobs(*args))
    chosen = torch.cat([c for c, _ in parts])
    entropy = torch.cat([e for _, e in parts]) if with_entropy else None  # type: ignore[misc]
    return chosen, entropy


LOGIT_TOKENS = 64
"""Response positions per LM-head slice: 64 x 49k vocabulary is 12 MB a tensor."""


def _head_logprobs(
    head: nn.Module, states: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(states).float()  # log-softmax in fp32 even on bf16 weights (no copy when already fp32)
    logits.div_(temperature)  # in place: neither a linear layer's nor a cast's backward reads its output
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    chosen = logp.gather(-1, targets).squeeze(-1)
    entropy = None
    if with_entropy:  # a metric: no gradient
        with torch.no_grad():
            entropy = entropy_from_logprobs(logp)
    return chosen, entropy

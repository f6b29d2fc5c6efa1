"""Rollouts: sample ``k`` completions per prompt, score them, and keep every log-prob a loss needs.

The frozen lower layers run once per rollout over ``query + response + EOS``; the policy, the
reference, the critic and a reward adapter on the same base all continue from that output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhfkit.data import Prompt
from rlhfkit.generation import SamplingParams, left_pad, sample_batch
from rlhfkit.models import lower_hidden, model_device
from rlhfkit.rl.losses import apply_eos_penalty
from rlhfkit.rl.roles import Roles
from rlhfkit.rl.scoring import RewardSource


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, Lq + Lr) query (left-padded) + response (right-padded); B = prompts x k
    mask: torch.Tensor
    query_len: int
    response_mask: torch.Tensor  # (B, Lr) float, 1 up to and including EOS
    lower: torch.Tensor | None
    logprobs: torch.Tensor  # of the policy that sampled (the "old" policy of the clipped ratio)
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # the critic's, when there is one
    scores: torch.Tensor  # normalised, before the EOS penalty
    penalized: torch.Tensor  # after the EOS penalty: what the algorithm optimises (with the KL term)
    ended: torch.Tensor
    entropy: torch.Tensor
    texts: list[str]
    prompts: list[Prompt]
    group_size: int  # completions per prompt, rows of one prompt adjacent


class PromptStream:
    """Prompts in a seeded shuffled order per epoch; the position is all a checkpoint needs."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # cpu: prompt order, a list
        return torch.randperm(self.n, generator=generator).tolist()  # cpu: read as a list at once

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


@torch.no_grad()
def collect_rollout(
    roles: Roles,
    tokenizer,
    reward: RewardSource,
    queries: Sequence[list[int]],
    prompts: Sequence[Prompt],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    normalize_reward: bool,
    missing_eos_penalty: float | None,
    eos_penalty_mode: str,
    with_values: bool,
) -> tuple[Rollout, dict[str, float]]:
    """Sample ``group_size`` completions for each query (rows of a prompt adjacent) and score them."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    t0 = time.perf_counter()
    rows = [q for q in queries for _ in range(group_size)]
    row_prompts = [p for p in prompts for _ in range(group_size)]
    device = model_device(roles.trunk)
    query_ids, query_mask = (t.to(device) for t in left_pad(rows, pad))
    roles.trunk.eval()
    batch = sample_batch(
        roles.trunk, tokenizer, query_ids, query_mask, SamplingParams(max_new_tokens, temperature, 1.0)
    )
    responses, response_mask, ended, texts = batch.responses, batch.mask, batch.ended, batch.texts
    t1 = time.perf_counter()

    # One extra column holds an EOS for responses cut without one: the reward model always
    # reads a sequence ending in EOS. Causal attention leaves earlier positions unchanged.
    extra = torch.where(ended, pad, eos)[:, None]
    ids_ext = torch.cat([query_ids, responses, extra], dim=1)
    mask_ext = torch.cat([query_mask, response_mask, (~ended).long()[:, None]], dim=1)
    lower_ext = lower_hidden(roles.trunk, ids_ext, mask_ext, roles.split) if roles.split > 0 else None
    ids, mask = ids_ext[:, :-1], mask_ext[:, :-1]
    lower = lower_ext[:, :-1] if lower_ext is not None else None
    qlen = query_ids.shape[1]

    logprobs, entropy = roles.policy_logprobs(ids, mask, lower, qlen, temperature, with_entropy=True)
    values = roles.values(ids, mask, lower, qlen) if with_values else None
    ref_logprobs = roles.reference_logprobs(ids, mask, lower, qlen, temperature)
    raw = reward.score(roles, ids_ext, mask_ext, lower_ext, qlen, row_prompts, texts)
    scores = reward.normalise(raw.float(), normalize_reward)
    penalized = apply_eos_penalty(scores, ended, missing_eos_penalty, eos_penalty_mode)
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
        prompts=row_prompts,
        group_size=group_size,
    )
    return rollout, {"time_generate": t1 - t0, "time_score": t2 - t1}

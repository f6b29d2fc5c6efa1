"""Scores of a rollout batch: a reward model (on its own backbone or as an adapter on the policy's),
a judge, or a ``module:function``; normalised as the reward model was trained."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rlhfkit.data import Prompt, prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import Judge, load_judge
from rlhfkit.reward import RewardModel, RewardModelDir, load_reward_model, read_reward_dir, reward_scores, score_texts
from rlhfkit.rl.roles import REWARD, Roles


class RewardSource:
    """Scores a rollout batch: a judge on texts, a separate reward model, or the shared ``reward`` adapter."""

    def __init__(self, spec: str, policy_name: str, full: bool, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
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
            self.info.head.requires_grad_(False).to(self.device)
        else:
            self.model, self.tokenizer, _ = load_reward_model(spec, self.device)
            self.model.requires_grad_(False)

    def shares_base(self, policy_name: str, full: bool) -> bool:
        return self.info is not None and self.info.kind != "full" and self.info.base == policy_name and not full

    def value_head_init(self, normalize: bool) -> nn.Linear | None:
        """The reward head rescaled to the normalised reward the trainer sees, when the backbone is shared."""
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
        roles: Roles,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lower: torch.Tensor | None,
        query_len: int,
        prompts: Sequence[Prompt],
        texts: Sequence[str],
    ) -> torch.Tensor:
        """Raw scores; ``ids``/``mask``/``lower`` cover ``query`` (left-padded to ``query_len``)
        ``+ response + EOS``, pooled as the reward model was trained (last token, or the response)."""
        if self.judge is not None:
            scores = self.judge([prompt_text(p) for p in prompts], list(texts))
            return torch.tensor(scores, dtype=torch.float32, device=ids.device)
        if self.model is not None:  # its own backbone and tokenizer: score the texts
            scores = score_texts(self.model, self.tokenizer, prompts, texts)
            return torch.tensor(scores, dtype=torch.float32, device=ids.device)
        assert self.info is not None
        with roles.adapter(REWARD if self.adapter_dir is not None else None):
            hidden = roles.hidden(roles.trunk, ids, mask, lower, self.adapter_split)
        completion_start = torch.full((ids.shape[0],), query_len, dtype=torch.long, device=ids.device)
        return reward_scores(self.info.head, hidden.float(), mask, completion_start, self.info.pooling)

    def normalise(self, scores: torch.Tensor, enabled: bool) -> torch.Tensor:
        if self.info is None or not enabled:
            return scores
        return self.info.normalise(scores)

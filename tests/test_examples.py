"""Every YAML file in examples/ loads into its command's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.cli import EvalConfig, GenerateConfig, LabelJudgeConfig
from rlhfkit.config import load_yaml_config, resolve_config
from rlhfkit.demo import DemoConfig
from rlhfkit.labeling.commands import LabelServeConfig
from rlhfkit.reward import RewardTrainConfig
from rlhfkit.rl.dpo import DPOConfig
from rlhfkit.rl.grpo import GRPOConfig
from rlhfkit.rl.ppo import PPOConfig
from rlhfkit.rl.rloo import RLOOConfig

EXAMPLES = Path(__file__).parent.parent / "examples"
CONFIGS = {
    "generate.yaml": GenerateConfig,
    "label_judge.yaml": LabelJudgeConfig,
    "label_serve.yaml": LabelServeConfig,
    "reward_train.yaml": RewardTrainConfig,
    "ppo.yaml": PPOConfig,
    "grpo.yaml": GRPOConfig,
    "rloo.yaml": RLOOConfig,
    "dpo.yaml": DPOConfig,
    "demo_quick.yaml": DemoConfig,
    "eval.yaml": EvalConfig,
}


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_loads(name: str) -> None:
    cls = CONFIGS[name]
    values = load_yaml_config(cls, EXAMPLES / name)
    assert values
    resolve_config(cls, EXAMPLES / name, {})


def test_example_guidelines_render_as_markdown() -> None:
    from rlhfkit.labeling.server import render_guidelines

    html = render_guidelines((EXAMPLES / "guidelines.md").read_text(encoding="utf-8"))
    assert html.startswith("<h1>") and "<strong>Prefer the less toxic one.</strong>" in html


def test_accelerate_configs_load() -> None:
    """The launcher configs under examples/accelerate/ parse as accelerate's own loader reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((EXAMPLES / "accelerate").glob("*.yaml"))
    assert files
    for path in files:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 2, path

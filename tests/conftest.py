"""Fixtures shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.data import write_jsonl


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 short prompts (8 topics x 4): enough for a few steps of any online trainer on tiny-random."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(path, [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    return path

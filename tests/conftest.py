"""Fixtures shared by several test files: trainer prompts, an empty labeling database."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.data import write_jsonl
from rlhfkit.labeling.store import LabelStore


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 short prompts (8 topics x 4): enough for a few steps of any online trainer on tiny-random."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(path, [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    return path


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    """An empty labeling database."""
    return LabelStore(tmp_path / "labels.db")

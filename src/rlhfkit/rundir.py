"""A training run's directory, the same for every stage that trains (reward model, PPO, GRPO, RLOO, DPO).

Layout::

    config.yaml                    every option of the run (``--resume`` reads it back)
    metrics.jsonl                  one JSON row per step, flushed as written
    checkpoints/step-NNNNNN/       trainable.safetensors, state.pt (optimizer, scheduler, every rank's RNGs),
                                   trainer_state.json (step, data position, controllers)
    best/                          trainable.safetensors + info.json: the weights a monitor liked best
    tensorboard/                   event files, when tensorboard is installed
    README.md                      the model card

Everything is written to a ``.tmp`` sibling and renamed, so a kill leaves the previous checkpoint
whole; a metrics line cut by a kill is ignored by ``read_metrics`` and dropped on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import load_yaml_config, save_config
from rlhfkit.data import write_text_atomic
from rlhfkit.errors import RlhfkitError

C = TypeVar("C")


# ----------------------------------------------------------------------------------------------
# Starting or resuming


def open_run(cfg: C, required: tuple[str, ...], may_change: tuple[str, ...] = ("max_steps",), write: bool = True) -> C:
    """The config a run goes on with: a new run's (its directory created) or, with ``cfg.resume``, the saved one.

    ``write``: save ``config.yaml`` (rank 0 of several processes; the others only read and check).

    A resumed run keeps its own settings: only the fields named in ``may_change`` may be given
    again (a value of ``None`` keeps the saved one); anything else differing from its default is an
    error that names the flags.
    """
    cls = type(cfg)
    if getattr(cfg, "resume", ""):
        run_dir = Path(cfg.resume)  # type: ignore[attr-defined]
        changed = [
            "--" + f.name.replace("_", "-")
            for f in dataclasses.fields(cls)
            if f.name not in ("resume", *may_change) and getattr(cfg, f.name) != f.default
        ]
        if changed:
            allowed = ", ".join("--" + n.replace("_", "-") for n in may_change) or "nothing"
            raise RlhfkitError(
                f"--resume continues with the run's own settings; only {allowed} may change (got {', '.join(changed)})"
            )
        if not (run_dir / "config.yaml").exists():
            raise RlhfkitError(f"{run_dir}: not a run directory (no config.yaml)")
        saved = load_yaml_config(cls, run_dir / "config.yaml")
        for name in may_change:
            if getattr(cfg, name) is not None:
                saved[name] = getattr(cfg, name)
        saved["resume"] = str(run_dir)
        saved["out"] = str(run_dir)  # the run may have moved since it started
        try:
            resumed = cls(**saved)
        except (TypeError, ValueError) as exc:
            raise RlhfkitError(f"{run_dir / 'config.yaml'}: {exc}") from exc
        if write:
            save_config(resumed, run_dir / "config.yaml")
        return resumed
    missing = [f"--{name.replace('_', '-')}" for name in required if not getattr(cfg, name)]
    if missing:
        raise RlhfkitError(f"missing required option {', '.join(missing)} (or --resume RUN_DIR)")
    out = Path(cfg.out)  # type: ignore[attr-defined]
    log = out / "metrics.jsonl"
    if log.exists() and log.stat().st_size:
        raise RlhfkitError(f"{out}: already holds a run; continue it with --resume {out} or pick another --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return cfg


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of ``run_dir/metrics.jsonl`` (``run_dir`` may also be the file); stops at a line cut by a kill."""
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the rows up to ``step`` (the checkpoint resumed from): a killed run's tail is redone."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (flushed per row) and, when available, to TensorBoard as ``prefix/key``."""

    def __init__(self, run_dir: Path, prefix: str) -> None:
        self.prefix = prefix
        self.file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{self.prefix}/{key}", value, row.get("step", 0))

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Checkpoints and best weights


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Put the finished ``tmp`` folder in ``folder``'s place, so a kill at any moment leaves one of them
    whole: its files are fsynced first, and a folder it replaces is moved aside (``*.tmp``, which no
    reader takes), not deleted, until the new one is in place."""
    for file in tmp.iterdir():
        with file.open("rb") as f:
            os.fsync(f.fileno())
    aside = folder.with_name(folder.name + ".replaced.tmp")
    if folder.exists():
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    tmp.rename(folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_tmp(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def rng_state() -> dict[str, Any]:
    """This process's random state: torch (CPU and every CUDA device), Python and NumPy."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    torch_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    rank_rngs: list[dict[str, Any]] | None = None,
) -> Path:
    """``checkpoints/step-NNNNNN``: weights, ``torch_state`` (optimizer, scheduler...) plus every RNG, and
    ``trainer_state`` (JSON); the oldest beyond ``keep`` are removed. ``rank_rngs``: each rank's random
    state, in rank order, when several processes train (rank 0 writes for all of them)."""
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = _fresh_tmp(folder)
    save_file(trainable, tmp / "trainable.safetensors")
    rngs = rank_rngs or [rng_state()]
    torch.save({**torch_state, **rngs[0], "rank_rngs": rngs}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    _replace_dir(tmp, folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(
        p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(
    folder: Path, expected: dict[str, torch.Tensor], rank: int = 0, world: int = 1
) -> tuple[dict, dict, dict]:
    """``(trainable, torch_state, trainer_state)`` of a checkpoint; this rank's RNGs restored. ``expected``
    (the model's trainable state) catches a checkpoint made with other settings, ``world`` one made
    with another number of processes (its ranks' random streams would not line up)."""
    trainable = load_file(folder / "trainable.safetensors")
    missing = set(expected) - set(trainable)
    if missing:
        raise RlhfkitError(f"{folder}: checkpoint lacks {sorted(missing)[:3]} (made with other settings?)")
    torch_state = torch.load(folder / "state.pt", weights_only=False)
    rngs = torch_state.get("rank_rngs", [torch_state])
    if len(rngs) != world:
        raise RlhfkitError(
            f"{folder}: made by {len(rngs)} process(es); resume it with {len(rngs)} (this run has {world})"
        )
    restore_rng(rngs[rank])
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    return trainable, torch_state, trainer_state


def save_best(run_dir: Path, trainable: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Keep ``trainable`` as ``best/`` (what a monitor-driven stop falls back to)."""
    folder = run_dir / "best"
    tmp = _fresh_tmp(folder)
    save_file(trainable, tmp / "trainable.safetensors")
    (tmp / "info.json").write_text(json.dumps(info))
    _replace_dir(tmp, folder)


def _whole(folder: Path) -> Path:
    """``folder``, put back from where ``_replace_dir`` moved it if a kill came between its two renames."""
    aside = folder.with_name(folder.name + ".replaced.tmp")
    if not folder.exists() and aside.exists():
        aside.rename(folder)
    return folder


def read_best(run_dir: Path) -> dict[str, Any] | None:
    info = _whole(run_dir / "best") / "info.json"
    return json.loads(info.read_text()) if info.exists() else None


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(_whole(run_dir / "best") / "trainable.safetensors")


# ----------------------------------------------------------------------------------------------
# Model card


def fmt_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(
    out: Path, title: str, intro: str, facts: list[str], table: dict[str, Any], table_title: str, footer: str
) -> None:
    """``README.md``: a title, what made it, a bullet list of facts, a metrics table and a closing line."""
    lines = [f"# {title}", "", intro, ""]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", f"| {table_title} | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_value(v)} |" for k, v in table.items()]
    lines += ["", footer, ""]
    write_text_atomic(out / "README.md", "\n".join(lines))

"""The run directory survives a kill inside its own writes: checkpoints and best weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit import rundir
from rlhfkit.rundir import latest_checkpoint, list_checkpoints, load_best, load_checkpoint, read_best, save_best


def _save(run: Path, step: int) -> None:
    rundir.save_checkpoint(run, step, {"w": torch.full((3,), float(step))}, {"optimizer": {"lr": step}}, {}, keep=2)


@pytest.mark.parametrize("dies_in", ["save_file", "save", "_replace_dir", "_fsync_dir"])
def test_a_kill_inside_a_checkpoint_save_leaves_the_last_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str
) -> None:
    """Killed while writing step 2's weights, its state, or while putting the folder in place: step 1
    (or step 2, if the folder was already in place) loads whole, and the next save works."""
    _save(tmp_path, 1)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    target = rundir.torch if dies_in == "save" else rundir
    real = getattr(target, dies_in)
    monkeypatch.setattr(target, dies_in, killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.setattr(target, dies_in, real)
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == ("step-000002" if dies_in == "_fsync_dir" else "step-000001")
    weights, _, trainer = load_checkpoint(last, {"w": torch.zeros(3)})
    assert trainer["step"] == int(last.name[-1]) and torch.equal(weights["w"], torch.full((3,), float(trainer["step"])))
    _save(tmp_path, 2)
    _save(tmp_path, 3)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


def test_best_weights_survive_a_kill_between_the_two_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_best(tmp_path, {"w": torch.ones(2)}, {"step": 1})
    real_rename, renames = Path.rename, []

    def dies_on_second_rename(self: Path, target: Path) -> Path:
        renames.append(self)
        if len(renames) == 2:  # the old best/ is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_best(tmp_path, {"w": torch.zeros(2)}, {"step": 2})
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "best").exists()
    assert read_best(tmp_path) == {"step": 1} and torch.equal(load_best(tmp_path)["w"], torch.ones(2))
    save_best(tmp_path, {"w": torch.zeros(2)}, {"step": 2})
    assert read_best(tmp_path) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

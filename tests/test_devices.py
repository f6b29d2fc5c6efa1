"""Device correctness: every tensor the sampling, serving and evaluation code makes names its device.

A ``torch.zeros(...)`` without ``device=`` lands on the CPU; next to a model on a GPU it fails
with "Expected all tensors to be on the same device" only when a GPU is there, so the CPU-only
test suite would never see it. This static check reads the source instead: every call of a torch
factory in ``CHECKED_FILES`` passes ``device=``, or carries a ``# cpu: why`` comment on one of its
lines saying why the tensor belongs on the CPU (it is ``.tolist()``-ed at once, it only indexes
CPU data, ...). ``*_like`` factories and ``Tensor.new_*`` inherit their source's device and are
not checked.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"

CHECKED_FILES: tuple[str, ...] = (
    "generation.py",
    "serving/server.py",
    "evaluation/__init__.py",
    "evaluation/fluency.py",
    "evaluation/report.py",
    "distributed.py",
    "rl/run.py",
    "rl/ppo.py",
    "rl/grpo.py",
    "rl/rloo.py",
    "rl/rollout.py",
    "rl/roles.py",
    "rl/scoring.py",
    "rl/losses.py",
    "rl/monitor.py",
)
"""Files (under src/rlhfkit) whose torch factory calls must say where their tensor goes."""

FACTORIES = frozenset(
    {
        "tensor",
        "as_tensor",
        "zeros",
        "ones",
        "full",
        "empty",
        "arange",
        "linspace",
        "eye",
        "rand",
        "randn",
        "randint",
        "randperm",
        "Generator",
    }
)
"""torch functions that make a tensor (or a generator) on the CPU unless told otherwise."""

CPU_MARK = "# cpu:"


def _cpu_comment_lines(source: str) -> set[int]:
    """Lines with a real ``# cpu: <reason>`` comment (tokenized, so a string holding it does not count)."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(CPU_MARK) and tok.string[len(CPU_MARK) :].strip():
            lines.add(tok.start[0])
    return lines


def offending_calls(source: str, filename: str) -> list[str]:
    """``file:line: torch.NAME(...)`` for each factory call without ``device=`` or a ``# cpu:`` reason."""
    excused = _cpu_comment_lines(source)
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        if excused & set(range(node.lineno, (node.end_lineno or node.lineno) + 1)):
            continue
        found.append(f"{filename}:{node.lineno}: torch.{node.func.attr}(...) without device=")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def test_the_checker_finds_calls_without_a_device_and_honours_cpu_reasons() -> None:
    source = (
        "import torch\n"
        "a = torch.zeros(3)\n"
        "b = torch.zeros(3, device=x.device)\n"
        "c = torch.tensor([1, 2]).tolist()  # cpu: read back at once\n"
        "d = torch.arange(4)  # cpu:\n"  # a mark without a reason excuses nothing
        "e = torch.full(\n    (2, 2),\n    0,  # cpu: only indexes a CPU list\n)\n"
        "f = torch.zeros_like(b)\n"
        "g = torch.Generator()\n"
        "h = '# cpu: in a string'; i = torch.ones(1)\n"
    )
    assert offending_calls(source, "x.py") == [
        "x.py:2: torch.zeros(...) without device=",
        "x.py:5: torch.arange(...) without device=",
        "x.py:11: torch.Generator(...) without device=",
        "x.py:12: torch.ones(...) without device=",
    ]


def test_every_evaluation_module_is_checked() -> None:
    modules = {str(p.relative_to(SRC)) for p in (SRC / "evaluation").glob("*.py")}
    assert modules <= set(CHECKED_FILES), sorted(modules - set(CHECKED_FILES))


@pytest.mark.parametrize("name", CHECKED_FILES)
def test_every_tensor_is_made_on_a_device(name: str) -> None:
    path = SRC / name
    offending = offending_calls(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parents[1])))
    assert not offending, "\n".join(
        ["torch factory calls without device= (add device=..., or '# cpu: why' on the call):", *offending]
    )

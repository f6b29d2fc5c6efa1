"""Helpers shared by the side-by-side benchmarks against TRL (`ppo_vs_trl.py`, `reward_vs_trl.py`).

Standard library only: the parents run these, and so may a worker in a TRL virtual environment.

- ``ensure_trl_venv``: a virtual environment for TRL beside the project's own, made once: the
  same pinned CPU torch first (from the local wheel when there is one), then TRL and the same
  transformers / peft / accelerate versions as the project's venv, then a check that torch is still
  the pinned CPU build (an unpinned torch would pull a multi-GB CUDA build).
- ``run_worker``: a worker script in its own process with the allocator tunables set, its JSON lines
  on stdout collected, its stderr kept in a log file.
- machine facts (``machine``, ``measured_line``: the report's first sentence) and small formatting
  helpers for the tables and ``bench/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUR_PYTHON = ROOT / ".venv" / "bin" / "python"
CACHE = BENCH / ".cache"
TORCH_VERSION = "2.13.0"
# Keep freed memory in the allocator: without it timings on these CPUs swing up to 3x (see the Makefile).
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"
# The versions the TRL venvs share with the project's venv (read from it, so both sides run the same stack).
SHARED_PACKAGES = ("transformers", "peft", "accelerate")
# Workers prefix their result lines with this; anything else on their stdout is a library's print.
MARK = "BENCH "


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def our_versions() -> dict[str, str]:
    """Versions of torch and the shared packages in the project's venv."""
    code = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{p: m.version(p) for p in {('torch', *SHARED_PACKAGES)!r}}}))"
    )
    out = subprocess.run([str(OUR_PYTHON), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _venv_versions(python: Path, packages: Sequence[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{p: v(p) for p in {tuple(packages)!r}}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _local_torch_wheel() -> str | None:
    """The pinned CPU torch wheel from pip's find-links folders on this disk, if one is there."""
    folders = [p for p in os.environ.get("PIP_FIND_LINKS", "").split() if p] + ["/opt/wheels"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in folders:
        for wheel in sorted(Path(folder).glob(f"torch-{TORCH_VERSION}+cpu-{tag}-*.whl")):
            return str(wheel)
    return None


def ensure_trl_venv(venv: Path, trl_version: str) -> Path:
    """Create (once) ``venv`` with torch==2.13.0 first, then ``trl==trl_version``; returns its python."""
    python = venv / "bin" / "python"
    wanted = {"trl": trl_version, **{p: v for p, v in our_versions().items() if p in SHARED_PACKAGES}}
    if python.exists() and (venv / ".installed").exists():
        have = _venv_versions(python, ["torch", *wanted])
        if have.get("torch") == f"{TORCH_VERSION}+cpu" and all(have.get(p) == v for p, v in wanted.items()):
            return python
        log(f"{venv}: versions differ from the wanted ones ({have}); rebuilding")
        shutil.rmtree(venv)
    log(f"creating {venv} (torch=={TORCH_VERSION} CPU, trl=={trl_version}); a few minutes, once")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first and pinned: then nothing below can swap it for a CUDA build.
    subprocess.run([*pip, _local_torch_wheel() or f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(
        [*pip, f"torch=={TORCH_VERSION}", *(f"{p}=={v}" for p, v in wanted.items())],
        check=True,
    )
    have = _venv_versions(python, ["torch", *wanted])
    if have.get("torch") != f"{TORCH_VERSION}+cpu":
        raise SystemExit(f"{venv}: torch is {have.get('torch')}, not {TORCH_VERSION}+cpu; remove the folder and retry")
    wrong = {p: have.get(p) for p, v in wanted.items() if have.get(p) != v}
    if wrong:
        raise SystemExit(f"{venv}: unexpected versions {wrong} (wanted {wanted})")
    (venv / ".installed").write_text(json.dumps(have, indent=2) + "\n")
    log(f"{venv}: ready ({', '.join(f'{k} {v}' for k, v in have.items())})")
    return python


def worker_env(threads: int | None = None) -> dict[str, str]:
    """The environment of every timed worker: allocator tunables set, no hub access, quiet tokenizers."""
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["WANDB_DISABLED"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(python: Path, script: str, args: Sequence[str], log_file: Path, label: str) -> list[dict]:
    """Run ``bench/script`` with ``python``; returns the JSON objects it printed after ``MARK``, one a line."""
    cmd = [str(python), str(BENCH / script), *args]
    log(f"{label}: {' '.join(cmd)}  (stderr -> {log_file})")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with log_file.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=worker_env(), cwd=ROOT)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if not line.startswith(MARK):
                    err.write(line)  # a library's own prints (TRL's log printer) go to the log
                    err.flush()
                    continue
                row = json.loads(line.removeprefix(MARK))
                rows.append(row)
                if "step" in row:
                    extra = "".join(f", {k} {row[k]:+.3f}" for k in ("reward", "loss") if row.get(k) is not None)
                    log(f"{label}: step {row['step']}: {row['seconds']:.1f} s{extra}")
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: leave no worker running behind
                proc.kill()
                proc.wait()
    log_file.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if code != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{label} failed (exit {code}); last lines of {log_file}:\n{tail}")
    return rows


def median_after_warmup(values: Sequence[float], warmup: int) -> float:
    timed = list(values[warmup:]) or list(values)
    return statistics.median(timed)


def machine() -> dict[str, str | int]:
    """Cores, CPU model and memory of this machine, for the table and RESULTS.md."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem_gib = f"{int(mem.split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        isa, mem_gib = [], "unknown"
    return {
        "cores": os.cpu_count() or 0,
        "cpu": model,
        "isa": ",".join(isa) or "unknown",
        "memory": mem_gib,
        "python": platform.python_version(),
    }


def measured_line(env: dict, trl_version: str) -> str:
    """The report's first sentence: date, machine, versions, allocator tunables, and the fp32 matmul rate
    before and after the runs when ``env`` has them (``gflops_start``, ``gflops_end``)."""
    rate = (
        f" fp32 matmul (2048^3, best of 5): {env['gflops_start']:.0f} GFLOP/s before, {env['gflops_end']:.0f} after."
        if "gflops_start" in env
        else ""
    )
    return (
        f"Measured {env['date']} on {env['cores']} cores ({env['cpu']}; {env['isa']}; {env['memory']} RAM), "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"accelerate {env['accelerate']}, TRL {trl_version}; `GLIBC_TUNABLES={GLIBC_TUNABLES}` for both runs; "
        f"each side in its own process, one after the other{' (`--quick`)' if env.get('quick') else ''}.{rate}"
    )


def write_results_section(path: Path, key: str, title: str, body: str) -> None:
    """Put ``body`` under ``## title`` in ``path``, replacing the section an earlier run wrote."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    header = (
        "# Benchmark results\n\n"
        "Written by the benchmarks in `bench/` (their full runs); each section is replaced by the next full run\n"
        "of its benchmark. Run them on an otherwise idle machine: two jobs at once on 2 cores run 5-20x slower.\n"
    )
    text = path.read_text(encoding="utf-8") if path.exists() else header
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def step_timer():
    """A transformers ``TrainerCallback`` (for the TRL workers) that records each optimizer step's
    seconds (``on_step_begin`` to ``on_step_end``) and logged loss in ``.rows``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.rows: list[dict[str, Any]] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            self.rows.append({"step": state.global_step, "seconds": time.perf_counter() - self.t0})

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            if self.rows and logs and "loss" in logs:
                self.rows[-1]["loss"] = float(logs["loss"])

    return StepTimer()

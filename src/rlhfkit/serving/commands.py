"""``rlhf serve`` and ``rlhf export``: their options and the wiring to ``serving`` / ``export``.

Kept apart from ``cli.py`` so the heavy imports (fastapi, uvicorn, peft) happen only when one of
these commands runs; ``register(app)`` adds both commands to the ``rlhf`` Typer app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import typer

from rlhfkit.config import REQUIRED, config_command, option
from rlhfkit.console import print_table
from rlhfkit.models import DEFAULT_MODEL, DEVICE_HELP, DTYPE_HELP

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=RUN_DIR`` strings as a name -> directory mapping (names unique, paths non-empty)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=RUN_DIR, got {spec!r}")
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"--adapter name {name!r}: use letters, digits and . _ - : / (no spaces)")
        if name in adapters:
            raise ValueError(f"--adapter name {name!r} given twice")
        adapters[name] = path
    return adapters


@dataclass
class ServeConfig:
    """Options of ``rlhf serve``."""

    base: str = option(DEFAULT_MODEL, "Base model: smollm2-135m, tiny-random, a model directory or org/name.")
    adapter: list[str] = option(
        [], "Adapter to serve as NAME=RUN_DIR (a `rlhf ppo` run or an adapter directory); repeat for several."
    )
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = option(8000, "Port to listen on.")
    served_model_name: str = option("", "Name clients use for the base model (default: the --base value).")
    max_batch_size: int = option(16, "Most sequences (requests x n) decoded together in one batch.")
    max_model_len: int = option(0, "Context length, prompt + completion tokens (0 = the model's own).")
    max_tokens: int = option(256, "max_tokens of a request that leaves it out (capped by the context).")
    max_queue: int = option(
        128, "Most requests waiting for a batch; past it a request gets 503 with Retry-After (bounded memory)."
    )
    max_body_bytes: int = option(2 * 1024 * 1024, "Largest request body in bytes; a larger one gets 413 unread.")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def __post_init__(self) -> None:
        parse_adapter_specs(self.adapter)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_batch_size < 1 or self.max_tokens < 1 or self.max_model_len < 0:
            raise ValueError("max_batch_size and max_tokens must be >= 1, max_model_len >= 0")
        if self.max_queue < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_queue must be >= 1 and max_body_bytes >= 1024")


def run_serve(cfg: ServeConfig) -> None:
    from rich.console import Console

    from rlhfkit.serving.server import ServeEngine, check_port, run_server

    check_port(cfg.host, cfg.port)
    adapters = parse_adapter_specs(cfg.adapter)
    engine = ServeEngine(
        cfg.base,
        adapters,
        served_model_name=cfg.served_model_name,
        max_batch_size=cfg.max_batch_size,
        max_model_len=cfg.max_model_len,
        default_max_tokens=cfg.max_tokens,
        max_queue=cfg.max_queue,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    dtype = str(engine.dtype).removeprefix("torch.")
    Console(stderr=True, soft_wrap=True).print(
        f"serving {', '.join(engine.model_names)} on {engine.device} ({dtype}, context {engine.context_length} "
        f"tokens) at http://{cfg.host}:{cfg.port}/v1 (OpenAI API); Ctrl-C stops after the requests in flight",
        markup=False,
        highlight=False,
    )
    run_server(engine, cfg.host, cfg.port, max_body_bytes=cfg.max_body_bytes)


@dataclass
class ExportConfig:
    """Options of ``rlhf export``."""

    base: str = option(DEFAULT_MODEL, "Base model the adapter was trained on.")
    adapter: str = option(REQUIRED, "A `rlhf ppo` run directory or an adapter directory.", required=True)
    out: str = option(REQUIRED, "Directory to write (must not exist, or be empty).", required=True)
    merge: bool = option(
        False, "Fold the adapter into the base weights: a standalone transformers model (else a peft adapter)."
    )


def run_export(cfg: ExportConfig) -> dict:
    from rlhfkit.serving.export import export_adapter

    summary = export_adapter(cfg.base, cfg.adapter, cfg.out, merge=cfg.merge)
    print_table("export", summary)
    return summary


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``export`` to the ``rlhf`` command."""
    config_command(
        app,
        "serve",
        ServeConfig,
        run_serve,
        "Serve a base model and LoRA adapters over the OpenAI HTTP API (model = adapter name).",
    )
    config_command(
        app,
        "export",
        ExportConfig,
        run_export,
        "Export a tuned adapter as a clean peft adapter, or merged into a standalone transformers model.",
    )

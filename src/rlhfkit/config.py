"""Dataclass configs, their YAML files and the CLI flags made from them.

Every command's options live in one dataclass; each field carries its help text in
``metadata["help"]``. ``config_command`` turns such a dataclass into a Typer command whose flags
are exactly the fields (so flags, YAML keys and ``--help`` can never drift apart), and
``resolve_config`` merges ``--config FILE.yaml`` with the flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import typer
import yaml
from rich.console import Console
from rich.text import Text

from rlhfkit.data import write_text_atomic
from rlhfkit.errors import RlhfkitError

C = TypeVar("C")

REQUIRED: Any = None
"""Default of a field that must be given (flag or YAML key)."""


def option(default: Any, help: str, *, required: bool = False) -> Any:
    """A config field with its help text; lists and dicts get a fresh copy per instance."""
    metadata = {"help": help, "required": required}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against the field type, converting the harmless cases (int -> float)."""
    target = _unwrap_optional(annotation)
    if target is not annotation and isinstance(value, str) and target in (int, float):
        if value.strip().lower() in ("none", "null", "off", ""):
            return None
        try:
            return target(value)
        except ValueError:
            raise RlhfkitError(f"{where}: expected {target.__name__} or 'off', got {value!r}") from None
    if value is None:
        if target is annotation:
            raise RlhfkitError(f"{where}: expected {getattr(target, '__name__', target)}, got null")
        return None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if get_origin(target) is list:
        if not isinstance(value, list):
            value = [value]
        (item_type,) = get_args(target) or (Any,)
        return [_coerce(v, item_type, where) for v in value]
    if target in (int, float, str, bool) and not (
        isinstance(value, target) and not (target is int and isinstance(value, bool))
    ):
        raise RlhfkitError(f"{where}: expected {target.__name__}, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def resolve_config(cls: type[C], config_file: Path | None, overrides: dict[str, Any]) -> C:
    """Build ``cls`` from defaults, then the YAML file, then the flags that were given."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_yaml_config(cls, config_file))
    for key, value in overrides.items():
        if value is not None and key in names:
            values[key] = _coerce(value, hints[key], f"--{key.replace('_', '-')}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and values.get(f.name) in (None, "", []):
            flag = "--" + f.name.replace("_", "-")
            raise RlhfkitError(f"missing required option {flag} (or '{f.name}:' in --config FILE.yaml)")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise RlhfkitError(str(exc)) from exc


def load_yaml_config(cls: type, path: Path) -> dict[str, Any]:
    """Read a YAML config, rejecting unknown keys and wrong types with the file named."""
    hints = _field_types(cls)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise RlhfkitError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise RlhfkitError(f"{path}: cannot read config file ({exc.strerror})") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RlhfkitError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise RlhfkitError(f"{path}: expected a mapping of option names to values")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise RlhfkitError(f"{path}: unknown key '{key}' (expected one of: {known})")
        values[name] = _coerce(value, hints[name], f"{path}: key '{key}'")
    return values


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config so a run directory says exactly how it was made (atomically: a kill
    leaves the old file or the new one, never half of one)."""
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn an ``RlhfkitError`` into one red line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except RlhfkitError as exc:
        Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(exc)))
        raise typer.Exit(2) from None


def config_command(group: typer.Typer, name: str, cls: type[C], run: Callable[[C], Any], help: str) -> None:
    """Register ``run`` as ``group``'s command ``name`` with one flag per field of ``cls``."""
    hints = _field_types(cls)
    params = []
    for f in dataclasses.fields(cls):
        annotation = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "")
        required = f.metadata.get("required", False)
        decls = [f"{flag}/--no-{flag[2:]}"] if annotation is bool else [flag]
        if annotation in (int, float) and annotation is not hints[f.name]:
            annotation = str  # an optional number: 'off' unsets it on the command line
            if default is not None:
                text += " ('off' to unset)"
        show = False if required or default in (None, "") else str(default)
        opt = typer.Option(None, *decls, help=text + (" (required)" if required else ""), show_default=show)
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=opt,
                annotation=typing.Optional[annotation],  # noqa: UP045
            )
        )
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="YAML file of options; flags given override it."),
            annotation=typing.Optional[Path],  # noqa: UP045
        )
    )

    def command(**kwargs: Any) -> Any:
        config_file = kwargs.pop("config", None)
        with exit_on_user_error():
            return run(resolve_config(cls, config_file, kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = help
    command.__name__ = name.replace("-", "_")
    group.command(name, help=help)(command)

"""Dataclass configs as CLI commands: defaults, YAML files, flag overrides and one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.config import REQUIRED, config_command, load_yaml_config, option, resolve_config, save_config
from rlhfkit.errors import RlhfkitError

# Wide enough that Rich never wraps an error line (see test_error_line_not_wrapped_at_80_columns).
ENV = {"COLUMNS": "300"}
runner = CliRunner()


@dataclass
class ToyConfig:
    """Options of the toy command."""

    name: str = option(REQUIRED, "Name of the run.", required=True)
    steps: int = option(3, "Number of steps.")
    rate: float = option(0.5, "Learning rate.")
    verbose: bool = option(False, "Print more.")
    shuffle: bool = option(True, "Shuffle the data.")
    tags: list[str] = option(["base"], "Tags; repeat the flag for several.")
    note: str | None = option(None, "Optional note.")
    max_len: int = option(10, "Longest input.")

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


FIELDS = [f.name for f in dataclasses.fields(ToyConfig)]


@pytest.fixture
def toy() -> tuple[typer.Typer, list[ToyConfig]]:
    """A fresh app with the toy command ``run`` (and a second command, so ``run`` is a subcommand)."""
    app = typer.Typer()
    seen: list[ToyConfig] = []
    config_command(app, "run", ToyConfig, seen.append, "Run the toy.")

    @app.command("noop")
    def noop() -> None:
        """Does nothing."""

    return app, seen


def run_toy(toy: tuple[typer.Typer, list[ToyConfig]], *args: str | Path):
    app, _ = toy
    result = runner.invoke(app, ["run", *(str(a) for a in args)], env=ENV)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def ok(toy: tuple[typer.Typer, list[ToyConfig]], *args: str | Path) -> ToyConfig:
    result = run_toy(toy, *args)
    assert result.exit_code == 0, result.output
    assert len(toy[1]) == 1
    return toy[1][0]


def user_error(toy: tuple[typer.Typer, list[ToyConfig]], *args: str | Path) -> str:
    """Run, expect exit 2 with exactly one ``error: ...`` line on stderr, return that line."""
    result = run_toy(toy, *args)
    assert result.exit_code == 2, result.output
    assert toy[1] == [], "the command ran despite the error"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Defaults, YAML, flags


def test_defaults_when_nothing_given(toy) -> None:
    cfg = ok(toy, "--name", "alpha")
    assert cfg == ToyConfig(name="alpha")
    assert cfg.steps == 3 and cfg.rate == 0.5 and cfg.verbose is False and cfg.shuffle is True
    assert cfg.tags == ["base"] and cfg.note is None


def test_list_default_is_a_fresh_copy_per_instance() -> None:
    a, b = ToyConfig(name="a"), ToyConfig(name="b")
    a.tags.append("x")
    assert b.tags == ["base"]


def test_yaml_values_used(toy, tmp_path: Path) -> None:
    path = write(
        tmp_path / "toy.yaml",
        "name: from-yaml\nsteps: 7\nrate: 0.25\nverbose: true\nshuffle: false\ntags: [a, b]\nnote: hello\n",
    )
    cfg = ok(toy, "--config", path)
    assert cfg == ToyConfig("from-yaml", 7, 0.25, True, False, ["a", "b"], "hello", 10)


def test_underscore_field_as_dashed_flag_and_either_yaml_key(toy, tmp_path: Path) -> None:
    assert ok(toy, "--name", "x", "--max-len", "20").max_len == 20
    for key in ("max_len", "max-len"):
        toy[1].clear()
        path = write(tmp_path / f"{key}.yaml", f"name: x\n{key}: 30\n")
        assert ok(toy, "--config", path).max_len == 30


def test_partial_yaml_keeps_other_defaults(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: x\nverbose: true\n")
    assert ok(toy, "--config", path) == ToyConfig(name="x", verbose=True)


def test_empty_yaml_file_is_no_options(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "empty.yaml", "")
    assert ok(toy, "--config", path, "--name", "x") == ToyConfig(name="x")


def test_flags_override_yaml(toy, tmp_path: Path) -> None:
    path = write(
        tmp_path / "toy.yaml",
        "name: yaml-name\nsteps: 7\nrate: 0.25\nverbose: true\nshuffle: false\ntags: [a, b]\n",
    )
    cfg = ok(toy, "--config", path, "--steps", "9", "--no-verbose", "--shuffle", "--tags", "z", "--name", "flag")
    # Flags win; keys without a flag keep the YAML value.
    assert cfg == ToyConfig("flag", 9, 0.25, False, True, ["z"], None, 10)


def test_flags_not_given_do_not_clobber_yaml(toy, tmp_path: Path) -> None:
    """Unset bool/list flags must not reset YAML values to False/[]."""
    path = write(tmp_path / "toy.yaml", "name: x\nverbose: true\nshuffle: false\ntags: [a, b]\n")
    cfg = ok(toy, "--config", path, "--steps", "4")
    assert (cfg.verbose, cfg.shuffle, cfg.tags, cfg.steps) == (True, False, ["a", "b"], 4)


@pytest.mark.parametrize(
    ("args", "verbose", "shuffle"),
    [
        ([], False, True),
        (["--verbose"], True, True),
        (["--no-verbose"], False, True),
        (["--no-shuffle"], False, False),
        (["--shuffle", "--verbose"], True, True),
    ],
)
def test_bool_flags(toy, args: list[str], verbose: bool, shuffle: bool) -> None:
    cfg = ok(toy, "--name", "x", *args)
    assert cfg.verbose is verbose and cfg.shuffle is shuffle


def test_list_field_from_repeated_flags(toy) -> None:
    assert ok(toy, "--name", "x", "--tags", "a", "--tags", "b", "--tags", "c").tags == ["a", "b", "c"]


def test_list_field_single_flag(toy) -> None:
    assert ok(toy, "--name", "x", "--tags", "only").tags == ["only"]


def test_yaml_scalar_for_list_field_becomes_one_item_list(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: x\ntags: solo\n")
    assert ok(toy, "--config", path).tags == ["solo"]


def test_int_for_float_field_in_yaml_accepted(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: x\nrate: 2\n")
    cfg = ok(toy, "--config", path)
    assert cfg.rate == 2.0 and isinstance(cfg.rate, float)


def test_number_for_str_field_in_yaml_accepted(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: 42\nnote: 1.5\n")
    cfg = ok(toy, "--config", path)
    assert (cfg.name, cfg.note) == ("42", "1.5")


def test_numeric_flags_parsed(toy) -> None:
    cfg = ok(toy, "--name", "x", "--steps", "11", "--rate", "1e-6")
    assert cfg.steps == 11 and cfg.rate == pytest.approx(1e-6)


# ----------------------------------------------------------------------------------------------
# Errors: exit 2, one line, the file and key named, never a traceback


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("steps", '"many"', "int"),
        ("steps", "1.5", "int"),
        ("steps", "true", "int"),
        ("rate", "fast", "float"),
        ("verbose", '"yes please"', "bool"),
        ("verbose", "1", "bool"),
        ("name", "[a, b]", "str"),
        ("tags", "[ok, {a: b}]", "str"),
    ],
)
def test_wrong_type_in_yaml(toy, tmp_path: Path, key: str, value: str, expected: str) -> None:
    base = "" if key == "name" else "name: x\n"
    path = write(tmp_path / "bad.yaml", f"{base}{key}: {value}\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line
    assert f"'{key}'" in line
    assert f"expected {expected}" in line


def test_unknown_yaml_key(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "typo.yaml", "name: x\nstesp: 4\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line and "'stesp'" in line
    assert "expected one of" in line
    for name in FIELDS:
        assert name in line


def test_invalid_yaml(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "name: [unclosed\nsteps: 3\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line and "not valid YAML" in line


def test_invalid_utf8_yaml(toy, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line


def test_yaml_that_is_not_a_mapping(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- name\n- steps\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line and "mapping" in line


def test_missing_config_file(toy, tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    line = user_error(toy, "--config", path)
    assert str(path) in line and "not found" in line


def test_missing_required_option(toy) -> None:
    line = user_error(toy, "--steps", "2")
    assert "--name" in line and "missing required option" in line


def test_empty_required_option_is_missing(toy) -> None:
    assert "--name" in user_error(toy, "--name", "")


def test_required_option_from_yaml_only(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "steps: 1\n")
    assert "--name" in user_error(toy, "--config", path)


def test_post_init_error_from_flag(toy) -> None:
    assert "steps must be >= 0, got -1" in user_error(toy, "--name", "x", "--steps", "-1")


def test_post_init_error_from_yaml(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: x\nsteps: -5\n")
    assert "steps must be >= 0, got -5" in user_error(toy, "--config", path)


def test_bad_flag_value_is_a_usage_error_not_a_traceback(toy) -> None:
    result = run_toy(toy, "--name", "x", "--steps", "many")
    assert result.exit_code == 2
    assert "--steps" in result.output
    assert toy[1] == []


def test_unknown_flag_is_a_usage_error(toy) -> None:
    result = run_toy(toy, "--name", "x", "--stesp", "3")
    assert result.exit_code == 2
    assert "--stesp" in result.output


def test_yaml_null_for_non_optional_field_is_rejected(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "null.yaml", "name: x\nrate: null\n")
    line = user_error(toy, "--config", path)
    assert str(path) in line and "'rate'" in line


def test_config_that_is_a_directory(toy, tmp_path: Path) -> None:
    line = user_error(toy, "--config", tmp_path)
    assert str(tmp_path) in line


def test_yaml_null_for_optional_field_is_none(toy, tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: x\nnote: null\n")
    assert ok(toy, "--config", path).note is None


# ----------------------------------------------------------------------------------------------
# Help


def test_help_lists_every_field_as_a_flag(toy) -> None:
    app, seen = toy
    result = runner.invoke(app, ["run", "--help"], env=ENV)
    assert result.exit_code == 0, result.output
    assert seen == []
    text = result.output
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text
    assert "--no-verbose" in text and "--no-shuffle" in text
    assert "--config" in text
    assert "(required)" in text
    for f in dataclasses.fields(ToyConfig):
        assert f.metadata["help"] in text


def test_command_help_text(toy) -> None:
    result = runner.invoke(toy[0], ["--help"], env=ENV)
    assert result.exit_code == 0
    assert "run" in result.output and "Run the toy." in result.output


# ----------------------------------------------------------------------------------------------
# resolve_config / save_config / load_yaml_config directly


def test_resolve_config_precedence(tmp_path: Path) -> None:
    path = write(tmp_path / "toy.yaml", "name: y\nsteps: 7\nrate: 3\n")
    cfg = resolve_config(ToyConfig, path, {"steps": 8, "verbose": None, "unknown": 1})
    assert cfg == ToyConfig(name="y", steps=8, rate=3.0)


def test_resolve_config_errors_are_rlhfkit_errors(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="--name"):
        resolve_config(ToyConfig, None, {})
    with pytest.raises(RlhfkitError, match="steps must be >= 0"):
        resolve_config(ToyConfig, None, {"name": "x", "steps": -2})


@pytest.mark.parametrize(
    "cfg",
    [
        ToyConfig(name="plain"),
        # Values YAML would misread if written unquoted: bools, nulls, numbers as strings.
        ToyConfig(name="on", steps=0, rate=1e-6, verbose=True, shuffle=False, tags=["null", "1", "yes"], note="3.5"),
        ToyConfig(name="with: colon # and hash", rate=12345.678, tags=[], note="multi\nline"),
    ],
)
def test_save_config_round_trips(tmp_path: Path, cfg: ToyConfig) -> None:
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_yaml_config(ToyConfig, path)
    assert loaded == dataclasses.asdict(cfg)
    assert ToyConfig(**loaded) == cfg
    assert resolve_config(ToyConfig, path, {}) == cfg


def test_saved_config_drives_the_command(toy, tmp_path: Path) -> None:
    cfg = ToyConfig(name="saved", steps=5, rate=0.125, verbose=True, shuffle=False, tags=["p", "q"], note="n")
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert ok(toy, "--config", path) == cfg


def test_option_metadata() -> None:
    by_name = {f.name: f for f in dataclasses.fields(ToyConfig)}
    assert by_name["name"].metadata == {"help": "Name of the run.", "required": True}
    assert by_name["steps"].metadata["required"] is False

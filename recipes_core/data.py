"""Load records from local JSON / JSONL / Parquet files (or a hub dataset name) and validate them.

Every problem is reported as a DataFormatError naming the file, the row (1-based line for JSONL) and
the field, with what to do, instead of a traceback from deep inside a parser or a silently dropped row.
"""

from __future__ import annotations

from recipes_core.errors import UserError

import json
from pathlib import Path

import datasets

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet"}

# field -> (expected type, may be empty)
SCHEMAS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "alpaca": {"instruction": (str, False), "input": (str, True), "output": (str, False)},
    "chat": {"messages": (list, False)},
    "classification": {"sentence1": (str, False), "sentence2": (str, False), "label": (int, False)},
}
OPTIONAL_FIELDS = {"alpaca": {"input"}}
CHAT_ROLES = ("system", "user", "assistant")


class DataFormatError(UserError, ValueError):
    """A data file that cannot be trained on; the message says where and what to fix."""


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """A data path that names no file."""


def _where(source: str, row: int, field: str | None = None) -> str:
    return f"{source}: row {row}" + (f": field '{field}'" if field else "")


def validate_record(record, fmt: str, source: str, row: int, num_labels: int = 2) -> None:
    """num_labels: classification labels are 0 .. num_labels - 1 (one per label word)."""
    if fmt not in SCHEMAS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(SCHEMAS)}")
    if not isinstance(record, dict):
        raise DataFormatError(f"{_where(source, row)}: expected a JSON object, got {type(record).__name__}")
    for field, (kind, may_be_empty) in SCHEMAS[fmt].items():
        if field not in record or record[field] is None:
            if field in OPTIONAL_FIELDS.get(fmt, ()):
                continue
            state = "is null" if field in record else "is missing"
            raise DataFormatError(f"{_where(source, row, field)} {state}; every {fmt} row needs "
                                  f"{sorted(SCHEMAS[fmt])}")
        value = record[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataFormatError(f"{_where(source, row, field)} should be {kind.__name__}, got "
                                  f"{type(value).__name__} ({value!r:.60})")
        empty = (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)
        if empty and not may_be_empty:
            raise DataFormatError(f"{_where(source, row, field)} is empty; remove the row or fill it in")
    if fmt == "classification" and not 0 <= record["label"] < num_labels:
        allowed = ", ".join(map(str, range(num_labels - 1))) + f" or {num_labels - 1}"
        raise DataFormatError(f"{_where(source, row, 'label')} is {record['label']!r}; labels are {allowed} "
                              f"(one per word in data.label_words)")
    if fmt == "chat":
        _validate_messages(record["messages"], source, row)


def _validate_messages(messages: list, source: str, row: int) -> None:
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataFormatError(f"{_where(source, row, field)} must be an object with string 'role' "
                                  "and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DataFormatError(f"{_where(source, row, field + '.role')} is {message['role']!r}; "
                                  f"use one of {CHAT_ROLES}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataFormatError(f"{_where(source, row, field + '.content')} is an empty assistant answer; "
                                  "there is nothing to learn from it")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{_where(source, row, 'messages')} has no assistant turn; nothing would be "
                              "supervised")


def read_text(path: Path) -> str:
    """A text file as UTF-8; a byte-order mark (Windows editors write one) is dropped, bytes that are not
    UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise DataFormatError(f"{path}: line {line}: byte {data[start]:#04x} at column {column} is not UTF-8; "
                              "save the file as UTF-8") from None


def _read_json_rows(path: Path) -> list:
    text = read_text(path)
    if path.suffix == ".jsonl" and text.lstrip().startswith("["):
        raise DataFormatError(f"{path}: row 1: a JSON array, but a .jsonl file holds one JSON object per line; "
                              "write one object a line, or rename the file to .json")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: row {line_no}: invalid JSON ({err.msg} at column {err.colno}); "
                                      "each line must be one JSON object") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    return list(enumerate(data, start=1))


def load_records(source: str | Path, fmt: str, split: str = "train", num_labels: int = 2) -> datasets.Dataset:
    """A validated `datasets.Dataset` from a local .json/.jsonl/.parquet file or a hub dataset name
    (classification: labels 0 .. num_labels - 1).

    Rows are numbered from 1: the line number in JSONL, the position in a JSON array or Parquet file.
    """
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise DataFileNotFoundError(f"{path}: no such data file; check the path (relative paths start from the "
                                  "folder the command runs in)")
        if path.is_dir():
            raise DataFormatError(f"{path}: a folder, not a data file; give one .jsonl, .json or .parquet file")
        if path.suffix == ".parquet":
            table = datasets.Dataset.from_parquet(str(path))
            rows = list(enumerate(table.to_list(), start=1))
        elif path.suffix in (".json", ".jsonl"):
            rows = _read_json_rows(path)
        else:
            raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
        label = str(path)
    else:  # a hub name, for users who are online
        rows = list(enumerate(datasets.load_dataset(str(source), split=split).to_list(), start=1))
        label = f"{source} ({split})"
    if not rows:
        raise DataFormatError(f"{label}: no rows (the file is empty or only blank lines); give one JSON object a "
                              "line")
    for row_no, record in rows:
        validate_record(record, fmt, label, row_no, num_labels)
    return datasets.Dataset.from_list([record for _, record in rows])

"""File reading with clear errors; JSON reading and atomic writing (temp file, then rename) are `encoders._files`'."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Iterator

from encoders._files import (atomic_dir, atomic_write, atomic_write_bytes, atomic_write_json,  # noqa: F401
                             atomic_write_safetensors, atomic_write_text, owned_dir, read_json, sweep_stale_temps)

from .errors import DataError


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSON-lines file of objects; errors name the line."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f, _utf8(path):
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """A file read as UTF-8 that is not (a spreadsheet's Latin-1 export, say): an error naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as "
                        "UTF-8") from None


def read_csv(path: str | Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; a missing required column is a DataError naming it."""
    return [row for _, row in read_csv_numbered(path, required)]


def read_csv_numbered(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every row of a CSV file (the line its record ends on; the header is line 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f, _utf8(path):
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {columns}")
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None

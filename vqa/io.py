"""File reading with clear errors; paths as shared files record them (`shared_path`); JSON reading and atomic
writing (temp file, then rename) are `encoders._files`'."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from encoders._files import (atomic_dir, atomic_write, atomic_write_bytes, atomic_write_json,  # noqa: F401
                             atomic_write_safetensors, atomic_write_text, owned_dir, read_json, sweep_stale_temps)

from .errors import DataError

LOCAL_PATH = "local:"  # a recorded path of the machine that ran it, reduced to its name (`shared_path`)


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSON-lines file of objects; errors name the line."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8-sig") as f, _utf8(path):  # -sig: a byte-order mark (Excel's "CSV UTF-8") is no text
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
    """(line number, row) for every row of a CSV file (the line its record ends on; the header is line 1); a .tsv
    file's fields are tab-separated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f, _utf8(path):
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {columns}")
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None


def shared_path(value: Any, *, relative: bool = True) -> Any:
    """`value` as a shared file records it: "local:NAME" where it names a file or folder of this machine, as is or
    after a prefix (`local-dir:/home/a/biomedclip`); else unchanged. An absolute path is one wherever it points;
    a relative one only where it exists here, and only with `relative` (a registered name such as
    `efficientnet-lite0-imagenet` must not become local because a folder of that name happens to be here)."""
    if not isinstance(value, str) or "://" in value:  # a URL names no one's folder
        return value
    for candidate in (value, value.split(":", 1)[1] if ":" in value else ""):
        if not candidate:
            continue
        for flavour in (PurePosixPath, PureWindowsPath):
            if flavour(candidate).is_absolute() and flavour(candidate).name:
                return LOCAL_PATH + flavour(candidate).name
        if candidate.startswith("~") or (relative and Path(candidate).exists()):
            return LOCAL_PATH + Path(candidate).expanduser().resolve().name
    return value


def hash_file(digest: Any, path: str | Path) -> Any:
    """`digest` (a hashlib object) updated with the bytes of the file at `path`, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest

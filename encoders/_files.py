"""Reading JSON with clear errors, and atomic writing, the one implementation every package uses: a temp name
beside the target, then rename.

Readers see the old file (or folder) or the whole new one, never half of it. Temp names
follow one pattern, `.NAME.<random>.tmp`, so leftovers of a killed process are recognisable.
Folders that several processes write take turns under an advisory lock (`exclusive`); a process's own
working folder in a shared one is marked as owned while it lives (`owned_dir`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

from ._errors import DataError

log = logging.getLogger(__name__)
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what tempfile.mkstemp/mkdtemp make from our prefix
LOCK_NAME = ".lock"  # held by the one process deciding or writing in a shared folder
OWNER_NAME = ".owner"  # locked by the process an `owned_dir` belongs to, while it lives


def _process_start() -> float:
    """When this process started (Linux: /proc/self), else when this module was imported."""
    try:
        return os.stat(f"/proc/{os.getpid()}").st_ctime
    except OSError:
        return _IMPORTED


_IMPORTED = time.time()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """Temp files and folders are private (0600/0700); what we publish gets the usual umask modes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temp_name_prefix(path: Path) -> str:
    """The prefix of every temp file or folder written for `path` (see the module docstring)."""
    return f".{path.name}."


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False, encoding: str = "utf-8") -> Iterator[IO]:
    """A file open for writing under a temp name; renamed over `path` on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as f:
            yield f
        _publish_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, binary=True) as f:
        f.write(data)


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Tensors as a safetensors file, atomically and with the usual modes (safetensors' own `save_file` leaves
    0600: unreadable to the rest of a group sharing a model folder)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file is a DataError naming it and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path`, on error it is removed.

    Without `overwrite` an existing `path` is a DataError."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name_prefix(path), suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_mode(tmp, directory=True)
    if path.exists():
        # two renames, not one swap: between them the previous copy waits in `old` (a kill there leaves it for
        # `sweep_stale_temps` to put back); a failed second rename puts it back at once
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name_prefix(path), suffix=".tmp"))
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if not path.exists():
                os.replace(old / path.name, path)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _restore_stranded(folder: Path, entry: Path) -> None:
    """A writer killed between `atomic_dir`'s two renames left the previous copy of FOLDER/NAME inside a temp
    folder (`.NAME.<8>.tmp/NAME`) and nothing at FOLDER/NAME: put it back."""
    name = entry.name[1:].rsplit(".", 2)[0]
    if entry.is_dir() and (entry / name).exists() and not (folder / name).exists():
        os.replace(entry / name, folder / name)
        log.warning("%s: put back the previous copy a killed write had set aside", folder / name)


def sweep_stale_temps(folder: str | os.PathLike, any_age: bool = False) -> list[Path]:
    """Remove what killed writers left in `folder`: entries named like our temp files (`.NAME.<8>.tmp`)
    last modified before this process started (a live writer's are newer); `any_age`: all of them (the caller
    holds the folder's lock, which every writer there holds while it writes). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    started, removed = float("inf") if any_age else _process_start(), []
    for entry in folder.iterdir():
        try:
            stale = _TEMP_NAME.match(entry.name) and entry.lstat().st_mtime < started
        except FileNotFoundError:
            continue
        if stale:
            _restore_stranded(folder, entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temp file(s) a killed run left in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed[:3]))
    return removed


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike) -> Iterator[bool]:
    """Hold `folder`'s lock file (an advisory lock, released when the process dies): one process at a time
    decides or writes there. In the feature cache, processes filling one cache at once (seeds run side by side)
    thus neither unlink nor overwrite each other's rows; readers take none: rows are only ever appended, by
    rename, so a mapped features file stays valid. Where the platform has no `fcntl` (Windows), writers are not
    serialised. Yields whether the lock is held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def owned_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new folder `parent/PREFIX<random>` of this process's own, removed when the block ends; while the process
    lives it holds the lock on the folder's `.owner` file. Folders of that prefix whose owner died (a killed run's)
    are removed first; those of processes still running (another job on the same cache) are left alone. Where the
    platform has no `fcntl`, ownership cannot be told and nothing else is removed."""
    parent = Path(parent)
    with exclusive(parent) as locked:  # no sweep between another process making its folder and locking it
        if locked:
            for entry in sorted(parent.glob(f"{prefix}*")):
                if entry.is_dir() and not _owned(entry):
                    log.info("removed %s, which a killed run left", entry)
                    shutil.rmtree(entry, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        handle = open(folder / OWNER_NAME, "a")
        if locked:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield folder
    finally:
        handle.close()  # first: Windows deletes no open file (a sweep between the two only removes it sooner)
        shutil.rmtree(folder, ignore_errors=True)


def _owned(folder: Path) -> bool:
    """Whether a live process holds `folder`'s owner lock (False for a folder that has none)."""
    import fcntl

    try:
        fd = os.open(folder / OWNER_NAME, os.O_RDWR)  # NFS emulates flock with fcntl locks: LOCK_EX needs write access
    except FileNotFoundError:
        return False
    except OSError:  # not ours to judge (unwritable): leave it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live owner holds it; any other: a file system that cannot tell, leave it
        return True
    finally:
        os.close(fd)  # closing releases a lock it took
    return False

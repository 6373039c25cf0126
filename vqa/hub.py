"""Bundles on the Hugging Face Hub: load one by repository id, push one with its model card.

    path = resolve_bundle("org/name")           # a local folder as is; a hub id downloaded (or read from the cache)
    push_bundle("runs/qcr/bundle", "org/name")  # writes README.md (the model card), then uploads the folder

What is uploaded is a copy (`shared_copy`: in the system's temp folder, hard-linked where it can be) in which every
path of this machine that a JSON file records (an eval report's bundle and data, an encoder's source folder, a text
model's `_name_or_path`) is reduced to "local:NAME", as a bundle's run_config.json already records them, with the
model card written into it; eval reports' per-question predictions stay behind unless asked for.

Downloads go through `huggingface_hub.snapshot_download`, so the Hub's own cache and switches
apply: `HF_HUB_CACHE` (where repositories are cached), `HF_HUB_OFFLINE=1` (read the cache only),
`HF_TOKEN` or `hf auth login` (private repositories, uploads).

Where an upload goes is injectable: `push_bundle(..., hub=...)` takes anything with `HfApi`'s
`create_repo` and `upload_folder`. `CacheHub(folder)` is one that writes into a hub cache folder
in the layout `snapshot_download` reads (`models--org--name/snapshots/<commit>/`, `refs/main`):
with `HF_HUB_CACHE` pointing there and `HF_HUB_OFFLINE=1`, the repository then loads by its id
with no network (what the tests do; `medvqa push --to-cache DIR` on the command line).
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, Sequence

from .errors import DataError

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub spells repository ids
# What an interrupted atomic write may leave (encoders._files, vqa.io.atomic_dir): a hidden ".NAME.XXXX.tmp" file,
# or such a folder with whatever it holds, at any depth. fnmatch patterns over the path (`*` crosses "/"), as
# huggingface_hub matches them.
UPLOAD_IGNORE = [".*.tmp", "*/.*.tmp", ".*.tmp/*", "*/.*.tmp/*"]
# every test question, its reference answer and the model's: for private data not the Hub's to hold, unless asked
PREDICTIONS = ["eval-*/predictions.jsonl"]
# a card below the top: an ONNX export's copy (earlier exports made one), naming this machine's bundle and stale
# after a recalibration; the card written at the top, for the repository, is the one shared
NESTED_CARDS = ["*/README.md"]
# JSON keys of a bundle's configs that may hold a path of the machine that wrote them: an encoder's name and source
# (`local-dir:/home/a/biomedclip`), a Hugging Face config's `_name_or_path` and tokenizer files, an ensemble's
# members. Uploaded as "local:NAME" (eval reports: `vqa.evaluate.shared_report`).
CONFIG_PATH_KEYS = ("name", "source", "_name_or_path", "name_or_path", "tokenizer_file", "special_tokens_map_file",
                    "bundle")
NOT_CONFIGS = ("tokenizer.json", "vocab.json", "answers.json")  # words and answers, not settings
EVAL_REPORT, EVAL_MARKDOWN = "eval-*/metrics.json", "eval-*/report.md"  # what `medvqa eval` writes in a bundle


def is_repo_id(name: str | Path) -> bool:
    """`org/name` that is not a local path: a Hub repository id. `runs/qcr` where a folder `runs` exists here is a
    local path, missing or not: a typo or an unfinished run must not fetch whatever a Hub account `runs` holds."""
    text = str(name)
    return (bool(REPO_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()
            and not Path(text).parent.is_dir())


def resolve_bundle(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local folder of a bundle given as a folder or as a Hub repository id.

    A hub id is fetched with `snapshot_download` into the hub cache (once; later calls, and offline
    runs, read the cache). Errors are one-line DataErrors naming the id and what to do."""
    if not is_repo_id(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise DataError(f"{path}: bundle folder not found (nor a Hugging Face Hub id org/name)")
        return path
    repo_id = str(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        folder = snapshot_download(repo_id, revision=revision, library_name="medvqa")
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise DataError(f"{repo_id}: no local folder of that name, and no such Hugging Face Hub model, or it is "
                        "private or gated and no token allows it (set HF_TOKEN or run `hf auth login`) "
                        f"({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise DataError(f"{repo_id}: the Hub has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise DataError(f"{repo_id}: no local folder of that name, and not in the Hugging Face cache while the Hub "
                        "cannot be reached (offline: HF_HUB_OFFLINE=1, or no network); download it once online, or "
                        "set HF_HUB_CACHE to a cache that holds it") from None
    return Path(folder)


class HubTarget(Protocol):
    """Where `push_bundle` uploads: `huggingface_hub.HfApi`, or a stand-in with the same two methods."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      ignore_patterns: list[str] | None = None) -> Any: ...


def push_bundle(bundle: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                hub: HubTarget | None = None, eval_reports: Sequence[str | Path] = (),
                license_id: str | None = None, with_predictions: bool = False) -> Any:
    """Check that `bundle` loads, write its model card (README.md) for `repo_id`, create the repository if
    needed and upload the folder as `shared_copy` shares it; returns what the hub's `upload_folder` returns (a
    commit, or its URL).

    `hub` defaults to `huggingface_hub.HfApi()` (token from HF_TOKEN or `hf auth login`)."""
    from .bundle import load
    from .model_card import CARD_FILE, write_model_card

    if not REPO_ID.fullmatch(repo_id):
        raise DataError(f"{repo_id!r}: a Hub repository id is org/name (letters, digits, '-', '_', '.')")
    load(bundle)  # a bundle that does not load must not reach the Hub
    if hub is None:
        from huggingface_hub import HfApi

        hub = HfApi(library_name="medvqa")
    message = commit_message or f"Upload medvqa bundle {Path(bundle).name}"
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    ignore = UPLOAD_IGNORE + NESTED_CARDS + ([] if with_predictions else PREDICTIONS)
    # In the system's temp folder, never beside the bundle (which may be read-only, or a hub cache's snapshot);
    # files are hard-linked where it shares the bundle's file system, copied elsewhere. Removed without chmod:
    # Windows would otherwise make a read-only file of the bundle writable through its link.
    tmp = Path(tempfile.mkdtemp(prefix="medvqa-push-"))
    try:
        shared = shared_copy(bundle, tmp / "bundle", ignore)
        load(shared)  # what is uploaded, its paths reduced, loads too
        # The card is written into the copy, from its reduced files (the earlier card's link replaced by rename, never
        # written through: its license is read first); then into the bundle too where that is a plain writable folder.
        card = write_model_card(shared, repo_id=repo_id, eval_reports=eval_reports, license_id=license_id)
        _refresh_card(Path(bundle) / CARD_FILE, card)
        try:
            hub.create_repo(repo_id, private=private, exist_ok=True)
            return hub.upload_folder(repo_id=repo_id, folder_path=str(shared), commit_message=message,
                                     ignore_patterns=UPLOAD_IGNORE)
        except OfflineModeIsEnabled:
            raise DataError(f"{repo_id}: HF_HUB_OFFLINE=1 forbids uploads (unset it, or push --to-cache DIR for a "
                            "local hub cache)") from None
        except LocalTokenNotFoundError:
            raise DataError(f"{repo_id}: no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
        except (HfHubHTTPError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{repo_id}: upload failed ({first})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CacheHub:
    """A hub in a local Hugging Face cache folder: `upload_folder` copies the bundle into
    `models--org--name/snapshots/<commit>/` and points `refs/main` at it, so `snapshot_download`
    (with `HF_HUB_CACHE` = this folder) finds it offline. The commit id is a hash of the files."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def repo_folder(self, repo_id: str) -> Path:
        return self.cache_dir / ("models--" + repo_id.replace("/", "--"))

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> str:
        folder = self.repo_folder(repo_id)
        if folder.exists() and not exist_ok:
            raise DataError(f"{repo_id}: already exists in {self.cache_dir}")
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "snapshots").mkdir(exist_ok=True)
        return str(folder)

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      ignore_patterns: list[str] | None = None) -> str:
        from .io import atomic_dir, atomic_write_text

        source = Path(folder_path)
        files = sorted(p for p in source.rglob("*") if p.is_file() and not _ignored(p.relative_to(source),
                                                                                      ignore_patterns or []))
        digest = hashlib.sha1((commit_message or "").encode())
        for f in files:
            digest.update(f"|{f.relative_to(source).as_posix()}|".encode())
            digest.update(f.read_bytes())
        commit = digest.hexdigest()  # 40 hex digits, as a git commit id
        folder = self.repo_folder(repo_id)
        with atomic_dir(folder / "snapshots" / commit, overwrite=True) as tmp:
            for f in files:
                target = tmp / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
        atomic_write_text(folder / "refs" / "main", commit)
        return commit


def shared_copy(bundle: str | Path, into: Path, ignore_patterns: list[str]) -> Path:
    """The bundle as it is shared: its files (less those `ignore_patterns` match) hard-linked into `into` (copied
    where a link cannot be made), with every path of this machine that its JSON files record reduced to
    "local:NAME": an eval report's bundle and data (`vqa.evaluate.shared_report`, its report.md's title too), and
    in configs the values under `CONFIG_PATH_KEYS`."""
    from .evaluate import shared_report
    from .io import atomic_write_json, atomic_write_text, read_json, shared_path
    from .ood import OOD_FILE

    source = Path(bundle)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = file.relative_to(source)
        if _ignored(relative, ignore_patterns) or (fnmatch.fnmatch(relative.as_posix(), EVAL_MARKDOWN)
                                                   and (file.parent / "metrics.json").is_file()):
            continue  # a report's markdown goes with its metrics.json
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.name == OOD_FILE and _shared_detector(file, target):
            continue
        report = fnmatch.fnmatch(relative.as_posix(), EVAL_REPORT)
        data = read_json(file) if file.suffix == ".json" and file.name not in NOT_CONFIGS else None
        if report and isinstance(data, dict):
            reduced = shared_report(data)
        else:
            reduced = _reduce_paths(data, CONFIG_PATH_KEYS, lambda v: shared_path(v, relative=False))
        if reduced != data:
            atomic_write_json(target, reduced)
        else:
            _link(file, target)
        markdown = file.parent / "report.md"
        if report and markdown.is_file():
            if reduced != data:  # the title names the bundle (`vqa.evaluate.markdown_report`): only it changes
                title, _, rest = markdown.read_text(encoding="utf-8").partition("\n")
                title = title.replace(f"`{data.get('bundle')}`", f"`{reduced.get('bundle')}`")
                atomic_write_text(target.parent / "report.md", title + "\n" + rest)
            else:
                _link(markdown, target.parent / "report.md")
    return into


def _shared_detector(file: Path, target: Path) -> bool:
    """Write `file` (ood.safetensors) to `target` with the space it names as `shared_path` records it, where that
    differs (a detector fitted by an earlier version in a folder's space named the folder); False: nothing to do."""
    from safetensors import safe_open

    from .io import atomic_write_safetensors, shared_path

    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {}
        space = metadata.get("space")
        shared = shared_path(space, relative=False)
        if space is None or shared == space:
            return False
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    atomic_write_safetensors(target, tensors, metadata={**metadata, "space": shared})
    return True


def _refresh_card(own: Path, card: Path) -> None:
    """The bundle's own README.md as the card just pushed, where it is a plain file or absent in a writable folder."""
    from .io import atomic_write_text

    if own.is_symlink():  # a hub cache's snapshot links to its blobs: the cache is not ours to change
        return
    try:
        atomic_write_text(own, card.read_text(encoding="utf-8"))
        log.info("wrote the model card %s", own)
    except OSError as e:  # a read-only bundle (an installed package's, a shared folder) still pushes
        log.info("%s: not refreshed (%s); the card was written into what is uploaded", own, e)


def _link(file: Path, target: Path) -> None:
    try:
        os.link(file, target)
    except OSError:  # another device, or a filesystem without hard links
        shutil.copy2(file, target)


def _reduce_paths(data: Any, keys: Sequence[str], reduce) -> Any:
    """`data` (parsed JSON) with each string under one of `keys`, at any depth, passed through `reduce`."""
    if isinstance(data, dict):
        return {k: reduce(v) if k in keys and isinstance(v, str) else _reduce_paths(v, keys, reduce)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_reduce_paths(v, keys, reduce) for v in data]
    return data


def _ignored(relative: Path, patterns: list[str]) -> bool:
    """As huggingface_hub's upload filters a path: fnmatch over its POSIX form."""
    return any(fnmatch.fnmatch(relative.as_posix(), p) for p in patterns)

"""The index folder on disk: which files it holds, its manifest, its advisory lock, and the errors for a folder that
is missing, already taken or corrupt.

Kept apart from the store and the vectors because all of them name these files, and because a folder is refused or
accepted (``create``, ``open``) before either is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.files import FILE_MODE, write_atomic

try:  # POSIX advisory locks; elsewhere the index is single-process only.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "cfic-corpus-index"
FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw")
MANIFEST = "manifest.json"
STORE = "store.sqlite"
LOCK = ".lock"
VECTORS_PREFIX = "vectors-"
VECTORS_SUFFIX = ".faiss"


class IndexCorruptError(CficError):
    """The index folder exists but its files are unreadable or disagree with each other."""


class IndexNotFoundError(CficError):
    """No index at the given folder."""


class IndexExistsError(CficError):
    """``create`` was pointed at a folder that already holds an index."""


def vectors_name(generation: int) -> str:
    """The faiss file of one generation; zero-padded so that names sort as generations do."""
    return f"{VECTORS_PREFIX}{generation:08d}{VECTORS_SUFFIX}"


def is_own_file(name: str) -> bool:
    """A file an index (or a creation of one that crashed) leaves in its folder."""
    return (name in (STORE, LOCK, f"{STORE}-journal") or name.startswith(VECTORS_PREFIX)
            or (name.startswith(".") and name.endswith(".tmp")))


def check_creatable(root: Path) -> None:
    """Refuse a folder that is a file, holds an index, or holds anything an index did not put there: an index
    deletes leftovers in its folder, so it must never be given someone's notes."""
    if root.exists() and not root.is_dir():
        raise CficError(f"{root} exists and is not a folder")
    check_no_manifest(root)
    if root.is_dir():
        stray = [p.name for p in root.iterdir() if not is_own_file(p.name)]
        if stray:
            raise CficError(f"{root} is not empty (has {stray[0]!r}); an index needs a folder of its own")


def check_no_manifest(root: Path) -> None:
    if (root / MANIFEST).exists():
        raise IndexExistsError(f"{root} already holds an index; open it instead")


def remove_leftovers(root: Path) -> None:
    """Files of a creation that crashed before its manifest was written (the caller holds the lock)."""
    for p in root.iterdir():
        if p.is_file() and p.name != LOCK:
            p.unlink()


def remove_stale_vectors(root: Path, current: str) -> None:
    """Faiss files of generations before ``current``, and temp files a crashed save left behind. Only a writer
    holding the lock calls this, so no other save is under way."""
    stale = [p for p in root.glob(f"{VECTORS_PREFIX}*{VECTORS_SUFFIX}") if p.name < current]
    stale += list(root.glob(f".{VECTORS_PREFIX}*.tmp"))
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()


def new_manifest(*, name: str, model_path: str | None, dimension: int, kind: str, passage_tokens: int,
                 hnsw: dict[str, int]) -> dict[str, Any]:
    """What an index records once, at creation: everything needed to reopen it and embed queries alike."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embedding_model": name,
        "embedding_model_path": model_path,
        "dimension": dimension,
        "kind": kind,
        "metric": "inner_product",
        "normalized": True,
        "passage_tokens": passage_tokens,
        "hnsw": hnsw,
        "created_at": time.time(),
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Written last at creation: a folder without a manifest is not an index yet."""
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2))


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the index at ``root``, checked to be one this code can read."""
    if not root.is_dir():
        raise IndexNotFoundError(f"no index at {root} (the folder does not exist)")
    path = root / MANIFEST
    if not path.is_file():
        raise IndexNotFoundError(f"{root} is not a cfic index (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"{path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path} is not a cfic index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CficError(f"{root}: index format version {manifest.get('format_version')!r} is not supported "
                        f"(this cfic reads version {FORMAT_VERSION})")
    if manifest.get("kind") not in INDEX_KINDS or not isinstance(manifest.get("dimension"), int):
        raise IndexCorruptError(f"{path}: bad 'kind' or 'dimension'")
    return manifest


@contextlib.contextmanager
def folder_lock(root: Path, *, shared: bool) -> Iterator[None]:
    """The folder's advisory lock (POSIX ``flock``): shared for readers, exclusive for one writer, so a reader
    never loads a generation while a writer is switching to the next."""
    if fcntl is None:
        yield
        return
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

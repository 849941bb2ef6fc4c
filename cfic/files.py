"""Writing files so that a kill or a crash never leaves half of one: the index, checkpoints of training and
distillation, converted models, probes and journals all go through these two functions. And reading the small
safetensors files cfic ships (SwiftKV parameters, the answerability probe) with one clear error when they are not.

Readers see the old file or the new one (a folder: see :func:`write_folder_atomic`). The temp is made next to the
target, so the final rename stays on one filesystem and is atomic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_MODE = 0o666  # as any tool's file: read-write for the owner, readable as the umask allows


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (not every filesystem lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Temp file in the same folder, fsync, rename.

    ``data`` is the bytes (a str is written as UTF-8), or a function that writes the temp file by name (faiss and
    ``torch.save`` write large objects straight to disk instead of through an in-memory copy)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE & ~_umask())  # mkstemp alone makes it 0600
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, (bytes, str)):
                fh.write(data.encode() if isinstance(data, str) else data)
            else:
                fh.close()
                data(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_folder_atomic(folder: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = True,
                        complete: Callable[[Path], bool] | None = None) -> None:
    """``fill(temp_folder)`` writes the folder's content; then it takes ``folder``'s place.

    A folder cannot be swapped in one rename: the old one is moved aside first and put back if the new one cannot
    be moved in, so a failure never loses it; a kill between the two renames leaves it in ``.<name>.old.*`` next
    to the target (:func:`previous_folder` finds it). ``replace=False``: when ``complete(folder)`` says another
    process already put a finished folder there, keep theirs and drop ours (two processes converting the same
    model both succeed); an unfinished one is replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        fill(tmp)
        if folder.exists():
            if not replace and (complete or _non_empty)(folder):
                return
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            folder.rename(old / folder.name)
        try:
            tmp.rename(folder)
        except OSError:
            if old is not None and not folder.exists():
                (old / folder.name).rename(folder)  # put the previous folder back (the finally drops the empty aside)
            if replace or not folder.exists():
                raise
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def previous_folder(folder: str | os.PathLike) -> Path | None:
    """The copy :func:`write_folder_atomic` moved aside when a kill stopped it between its two renames."""
    folder = Path(folder)
    for aside in sorted(folder.parent.glob(f".{folder.name}.old.*")):
        if (aside / folder.name).is_dir():
            return aside / folder.name
    return None


def _non_empty(folder: Path) -> bool:
    return any(folder.iterdir())


def read_safetensors(path: str | os.PathLike, framework: str, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``(metadata, tensors)`` of a safetensors file; a ValueError naming ``what`` (e.g. "SwiftKV parameters")
    when it is missing or unreadable -- it is the user's input, so never a library traceback."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r}: no such file")
    try:
        with safe_open(str(path), framework=framework) as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ValueError(f"{what} {str(path)!r}: not a safetensors file ({exc})") from exc
    return meta, tensors


def array_digest(header: str, arrays: Any) -> str:
    """A short content hash of fitted weights: ``header`` (their scalars) and each array as float32 (None skipped)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(header.encode())
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class SameByDigest:
    """Equality and hashing by the ``digest`` property: fitted weights hold arrays, whose dataclass equality is
    ambiguous, and two loads of one file must compare equal (configurations and caches key on them)."""

    digest: str

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.digest == self.digest  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.digest)

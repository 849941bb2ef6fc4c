"""Users' question sets and evaluation files, read through the ``datasets`` library.

One loader for everything a user may bring: JSON lines / JSON (optionally gzipped), CSV, parquet, a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or, with network, a dataset name on the Hugging Face hub.
``datasets`` handles the formats (types, nested lists, compression, memory mapping of large files); this module only
turns each way it can fail into a :class:`~cfic.errors.CficError` that names the source. ``datasets`` is imported
when a table is loaded, so commands that never read one start without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cfic.errors import CficError

# file suffix -> the ``datasets`` builder that reads it (compressed JSON keeps its inner suffix)
_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(source: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything with a file suffix, a leading ``.``/``/``/``~`` or more
    than one slash is meant as a local path (so a typo in a file name is reported as a missing file)."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in
            {*_BUILDERS, ".gz", ".bz2", ".xz", ".zst", ".txt", ".tsv", ".arrow"})


def _pick_split(table: Any, split: str | None, where: str) -> Any:
    """A ``DatasetDict`` needs a split: the one asked for, or its only one."""
    from datasets import DatasetDict

    if not isinstance(table, DatasetDict):
        if split is not None:
            raise CficError(f"{where} is a single table; --split {split!r} applies to saved DatasetDicts and hub "
                            "datasets")
        return table
    names = list(table.keys())
    if split is None:
        if len(names) == 1:
            return table[names[0]]
        raise CficError(f"{where} has several splits ({', '.join(names)}): choose one with --split")
    if split not in table:
        raise CficError(f"{where} has no split {split!r}; it has {', '.join(names)}")
    return table[split]


def load_table(source: str | Path, *, split: str | None = None) -> Any:
    """The rows of ``source`` as a ``datasets.Dataset`` (iterate it for dicts, one per row)."""
    import datasets

    datasets.disable_progress_bars()  # our own bars say what happens; a builder's bar per file is noise
    text = str(source)
    if not text.strip():
        raise CficError("the data source is empty: give a file, a saved dataset folder or a hub name")
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            try:
                table = datasets.load_from_disk(str(path))
            except FileNotFoundError as exc:
                raise CficError(f"{text!r} is a folder but not one written by Dataset.save_to_disk ({exc})") from exc
            table = _pick_split(table, split, repr(text))
        elif path.exists():
            builder = _builder_for(path)
            if builder is None:
                raise CficError(f"{text!r}: unknown file type; use .jsonl, .json, .csv or .parquet (.gz allowed for "
                                "JSON)")
            if path.stat().st_size == 0:
                raise CficError(f"{text!r} is empty")
            if split is not None:
                raise CficError(f"{text!r} is a single file; --split applies to saved DatasetDicts and hub datasets")
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif _looks_like_path(text):
            raise CficError(f"data file {text!r} does not exist")
        else:
            table = _load_from_hub(text, split)
    except CficError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CficError(f"could not read {text!r}: {first_line[:300]}") from exc
    if len(table) == 0:
        raise CficError(f"{text!r} has no rows")
    return table


def _load_from_hub(name: str, split: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split or "train")
    except (ConnectionError, OSError) as exc:
        raise CficError(f"could not load {name!r} from the Hugging Face hub (no network, or no such dataset: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}); "
                        "local .jsonl/.csv/.parquet files and saved dataset folders work offline") from exc
    except ValueError as exc:  # e.g. an unknown split
        raise CficError(f"{name!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------- row fields
# The fields every question table shares (``cfic batch`` rows, generic evaluation rows), checked one way.


def row_question(row: Mapping[str, Any], where: str) -> str:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise CficError(f"{where}: 'question' must be a non-empty string")
    return question


def row_id(row: Mapping[str, Any], where: str, default: str) -> str:
    """The row's ``id`` as a string (``default`` when absent); ids name rows in outputs, so only strings and
    integers are taken."""
    raw_id = row.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, type(None))) or raw_id == "":
        raise CficError(f"{where}: 'id' must be a non-empty string or an integer")
    return default if raw_id is None else str(raw_id)


def row_texts(row: Mapping[str, Any], where: str) -> tuple[str, ...] | None:
    """The row's ``documents`` (list) or ``document`` (one string); ``None`` when it has neither."""
    many, one = row.get("documents"), row.get("document")
    if many is not None and one is not None:
        raise CficError(f"{where}: give 'documents' or 'document', not both")
    if one is not None:
        many = [one]
    if many is None:
        return None
    if isinstance(many, str) or not isinstance(many, Iterable):
        raise CficError(f"{where}: 'documents' must be a list of strings (use 'document' for one)")
    texts = tuple(many)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise CficError(f"{where}: documents must be non-empty strings")
    return texts

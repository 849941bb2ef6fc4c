"""The SQLite side of a corpus index: documents (whole, with their metadata), passages (vector id -> document and
character span), tombstoned vector ids and the ``meta`` counters (current generation, next vector id).

All SQL of the index lives here. The connection runs in autocommit mode; a save is one explicit
``BEGIN IMMEDIATE ... COMMIT`` (:meth:`DocumentStore.transaction`), whose commit is what switches the index to a new
generation.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfic.retrieval.folder import IndexCorruptError
from cfic.types import Document

# SQLite caps the bound parameters of one statement (999 before 3.32), so ``IN (...)`` lists go in chunks.
SQL_CHUNK = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, metadata TEXT NOT NULL, n_passages INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS passages (
    vid INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, start_char INTEGER NOT NULL, end_char INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id);
CREATE TABLE IF NOT EXISTS dead (vid INTEGER PRIMARY KEY);
"""


class DocumentStore:
    """One connection to ``store.sqlite``; usable from any thread, serialised by the caller's lock."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn

    @classmethod
    def create(cls, path: Path) -> DocumentStore:
        """A fresh store at generation 0 with no vector ids handed out yet."""
        store = cls(path, _connect(path))
        store.conn.executescript(SCHEMA)
        store.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                               [("generation", "0"), ("next_vid", "0")])
        return store

    @classmethod
    def open(cls, path: Path) -> DocumentStore:
        """The existing store at ``path`` (checked to exist first: connecting would create an empty one)."""
        if not path.is_file():
            raise IndexCorruptError(f"{path.parent} has a manifest but no {path.name}")
        try:
            return cls(path, _connect(path))
        except sqlite3.Error as exc:
            raise IndexCorruptError(f"{path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One save: everything written inside commits together or not at all. ``IMMEDIATE`` takes SQLite's write
        lock at the start, so a save never fails half-way for want of it."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise

    def _rows_in(self, sql: str, values: Iterable[Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` once per chunk of ``values``, its ``{marks}`` replaced by that chunk's ``?`` placeholders;
        the rows of every chunk."""
        values = list(values)
        rows: list[tuple[Any, ...]] = []
        for lo in range(0, len(values), SQL_CHUNK):
            chunk = values[lo : lo + SQL_CHUNK]
            rows += self.conn.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    # ------------------------------------------------------------------ meta

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise IndexCorruptError(f"{self.path}: missing meta key {key!r}")
        return str(row[0])

    def generation(self) -> int:
        return int(self.meta("generation"))

    def set_generation(self, generation: int) -> None:
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))

    def next_vid(self) -> int:
        return int(self.meta("next_vid"))

    def load_state(self) -> tuple[int, np.ndarray, int]:
        """(generation, tombstoned vector ids sorted, number of passages), or IndexCorruptError when the file is not
        a store of this format."""
        try:
            self.conn.execute("SELECT 1 FROM meta, documents, passages, dead LIMIT 1").fetchall()
            generation = self.generation()
            dead = np.fromiter((r[0] for r in self.conn.execute("SELECT vid FROM dead ORDER BY vid")), dtype=np.int64)
            return generation, dead, self.count_passages()
        except (sqlite3.Error, ValueError) as exc:
            raise IndexCorruptError(f"{self.path} is corrupt or not a cfic store: {exc}") from exc

    # ------------------------------------------------------------------ documents

    def count_documents(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def count_passages(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def contains(self, doc_id: object) -> bool:
        return self.conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM documents ORDER BY id")]

    def present(self, doc_ids: Iterable[str]) -> set[str]:
        """Which of ``doc_ids`` are stored."""
        return {r[0] for r in self._rows_in("SELECT id FROM documents WHERE id IN ({marks})", doc_ids)}

    def documents(self, doc_ids: Iterable[str]) -> dict[str, Document]:
        """The stored documents among ``doc_ids``, by id."""
        rows = self._rows_in("SELECT id, text, metadata FROM documents WHERE id IN ({marks})", doc_ids)
        return {doc_id: Document(text=text, id=doc_id, metadata=json.loads(meta)) for doc_id, text, meta in rows}

    def insert(self, docs: Sequence[Document], spans: Sequence[tuple[int, int]], owners: Sequence[int],
               vids: np.ndarray) -> None:
        """Rows for ``docs`` and their passages (passage ``i`` is ``spans[i]`` of ``docs[owners[i]]`` with vector id
        ``vids[i]``); hands out the vector ids up to ``vids``' end."""
        n_passages: dict[str, int] = {}
        for owner in owners:
            n_passages[docs[owner].id] = n_passages.get(docs[owner].id, 0) + 1
        now = time.time()
        self.conn.executemany(
            "INSERT INTO documents(id, text, metadata, n_passages, added_at) VALUES (?, ?, ?, ?, ?)",
            [(d.id, d.text, json.dumps(d.metadata, ensure_ascii=False), n_passages.get(d.id, 0), now) for d in docs],
        )
        self.conn.executemany(
            "INSERT INTO passages(vid, doc_id, start_char, end_char) VALUES (?, ?, ?, ?)",
            [(int(v), docs[o].id, a, b) for v, o, (a, b) in zip(vids, owners, spans, strict=True)],
        )
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'next_vid'", (str(self.next_vid() + len(vids)),))

    def delete(self, doc_ids: Iterable[str]) -> None:
        """Documents and their passages (their vectors are the caller's to drop)."""
        doc_ids = list(doc_ids)
        self._rows_in("DELETE FROM passages WHERE doc_id IN ({marks})", doc_ids)
        self._rows_in("DELETE FROM documents WHERE id IN ({marks})", doc_ids)

    # ------------------------------------------------------------------ passages and tombstones

    def vids_of(self, doc_ids: Iterable[str]) -> np.ndarray:
        """The vector ids of the passages of ``doc_ids``, sorted."""
        rows = self._rows_in("SELECT vid FROM passages WHERE doc_id IN ({marks})", doc_ids)
        return np.asarray(sorted(r[0] for r in rows), dtype=np.int64)

    def passages(self, vids: Iterable[int]) -> dict[int, tuple[str, int, int]]:
        """Vector id -> (document id, start_char, end_char) for the ``vids`` that are stored."""
        rows = self._rows_in("SELECT vid, doc_id, start_char, end_char FROM passages WHERE vid IN ({marks})", vids)
        return {int(vid): (doc_id, int(a), int(b)) for vid, doc_id, a, b in rows}

    def add_dead(self, vids: np.ndarray) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO dead(vid) VALUES (?)", [(int(v),) for v in vids])

    def clear_dead(self) -> None:
        self.conn.execute("DELETE FROM dead")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; saves open their own (DocumentStore.transaction).
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)

"""Keeping the SQLite store and the faiss file in step, one generation at a time.

A save writes the new faiss index to a temporary file, renames it to ``vectors-<gen+1>.faiss`` and only then commits
the SQLite transaction that switches ``generation`` to it (SQLite's journal makes that commit atomic). A crash at any
point leaves either the old generation or the new one, never a mixture; the old file is deleted after the commit.
Another process may save at any time, so readers compare the store's generation with the one they loaded before
each read, and writers before each change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from cfic.errors import CficError
from cfic.retrieval.folder import STORE, folder_lock, remove_stale_vectors, vectors_name
from cfic.retrieval.store import DocumentStore
from cfic.retrieval.vectors import PassageVectors

# What a save applies: faiss in memory and SQLite rows, inside the save's transaction.
Change = Callable[[DocumentStore, PassageVectors], None]


class Generations:
    """The store of an index folder and the vectors of the generation this process has loaded.

    Not thread-safe on its own: the index serialises calls with its lock, and processes with the folder's lock
    (a writer holds it exclusively around :meth:`refresh` and :meth:`save`)."""

    def __init__(self, root: Path, kind: str, dimension: int, hnsw: dict[str, int], store: DocumentStore):
        self.root = root
        self.kind = kind
        self.dimension = dimension
        self.hnsw = hnsw
        self._store: DocumentStore | None = store
        self._vectors: PassageVectors | None = None
        self.generation = -1

    @classmethod
    def create(cls, root: Path, kind: str, dimension: int, hnsw: dict[str, int]) -> Generations:
        """Generation 0 of a new index: an empty store and an empty faiss file."""
        state = cls(root, kind, dimension, hnsw, DocumentStore.create(root / STORE))
        state._vectors = PassageVectors.empty(kind, dimension, hnsw)
        state._vectors.write(root / vectors_name(0))
        state.generation = 0
        return state

    @classmethod
    def open(cls, root: Path, kind: str, dimension: int, hnsw: dict[str, int]) -> Generations:
        """The current generation of an existing index, loaded under the shared lock."""
        state = cls(root, kind, dimension, hnsw, DocumentStore.open(root / STORE))
        try:
            with state.lock(shared=True):
                state.load()
        except BaseException:
            state.close()
            raise
        return state

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store = None
        self._vectors = None

    @property
    def store(self) -> DocumentStore:
        if self._store is None:
            raise CficError("the index is closed")
        return self._store

    @property
    def vectors(self) -> PassageVectors:
        """The loaded generation's vectors (``sync``/``refresh`` first to see other processes' saves)."""
        if self._vectors is None:
            raise CficError("the index is closed")
        return self._vectors

    def lock(self, *, shared: bool) -> contextlib.AbstractContextManager[None]:
        return folder_lock(self.root, shared=shared)

    def load(self) -> None:
        """Read the current generation's faiss file and check it against the store."""
        generation, dead, n_passages = self.store.load_state()
        self._vectors = PassageVectors.read(self.root / vectors_name(generation), self.kind, self.dimension,
                                            self.hnsw, dead, n_passages)
        self.generation = generation

    def refresh(self) -> None:
        """Before a change (the caller holds the exclusive lock): pick up a generation another process saved."""
        if self.store.generation() != self.generation:
            self.load()

    def sync(self) -> None:
        """Before a read: a long-lived reader (a server) sees what ``cfic index add`` saved meanwhile. One SQLite
        read when nothing changed; a reload of the faiss file when something did."""
        if self.store.generation() != self.generation:
            with self.lock(shared=True):
                self.load()

    def save(self, change: Change) -> None:
        """Apply ``change`` as one atomic save; the caller holds the exclusive lock.

        Order: BEGIN; change; rebuild an HNSW graph whose tombstones passed a quarter of it; faiss -> temp file ->
        ``vectors-<gen+1>.faiss``; switch ``generation``; COMMIT. Any failure rolls SQLite back and reloads the old
        generation, so memory and disk agree again.
        """
        store, vectors = self.store, self.vectors
        new_gen = self.generation + 1
        new_path = self.root / vectors_name(new_gen)
        try:
            with store.transaction():
                change(store, vectors)
                if vectors.needs_compaction():
                    compact(store, vectors)
                vectors.write(new_path)
                store.set_generation(new_gen)
        except BaseException:
            with contextlib.suppress(OSError):
                if store.generation() != new_gen:
                    new_path.unlink()
            self.load()
            raise
        self.generation = new_gen
        remove_stale_vectors(self.root, new_path.name)


def compact(store: DocumentStore, vectors: PassageVectors) -> None:
    """A :data:`Change` that rebuilds an HNSW graph without its tombstones, in faiss and in the store alike."""
    vectors.compact()
    store.clear_dead()


def drop_documents(store: DocumentStore, vectors: PassageVectors, doc_ids: list[str]) -> None:
    """Documents out of both halves: their vectors removed or tombstoned, then their rows deleted."""
    store.add_dead(vectors.drop(store.vids_of(doc_ids)))
    store.delete(doc_ids)

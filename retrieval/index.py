"""A persistent faiss index over whole documents, for finding the documents CFIC then grounds in.

What is embedded for a document: its sentences, packed in order into passages of at most ``passage_tokens``
embedding-model tokens (default 128: all-MiniLM-L6-v2 was trained on inputs of up to 128 tokens and silently
truncates past 256; see :mod:`cfic.retrieval.passages`). Each passage is one vector; every vector id maps back to its
document, and a document's score for a query is the maximum over its passages (its best passage). The document
itself is stored whole, because grounding reads the whole document.

On disk, one folder (:mod:`cfic.retrieval.folder`)::

    manifest.json          format version, embedding model name and dimension, index kind (written once)
    store.sqlite           documents (id, text, metadata JSON), passages (vector id -> document, offsets), meta
    vectors-<gen>.faiss    the faiss index of generation <gen>; store.sqlite names the current generation
    .lock                  advisory lock: one writer at a time, readers never see a half-written state

Every save switches both files to a new generation at once (:mod:`cfic.retrieval.generations`), so a crash leaves
the old generation or the new one, never a mixture. Nothing is pickled.

This module is the facade: the public API, documents in, hits out. :mod:`cfic.retrieval.store` holds the SQL,
:mod:`cfic.retrieval.vectors` the faiss index (kinds ``flat`` and ``hnsw``, HNSW's tombstones).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import sqlite3
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfic.documents import as_document, content_id
from cfic.errors import CficError, EmptyQueryError, require_positive_int
from cfic.retrieval.folder import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_KINDS,
    LOCK,
    MANIFEST,
    STORE,
    IndexCorruptError,
    IndexExistsError,
    IndexNotFoundError,
    check_creatable,
    check_no_manifest,
    folder_lock,
    new_manifest,
    read_manifest,
    remove_leftovers,
    write_manifest,
)
from cfic.retrieval.generations import Generations, compact, drop_documents
from cfic.retrieval.passages import split_documents
from cfic.retrieval.store import DocumentStore
from cfic.retrieval.vectors import PassageVectors, unit_rows
from cfic.types import Document

if TYPE_CHECKING:
    from cfic.retrieval.embedder import Embedder

__all__ = [
    "FORMAT", "FORMAT_VERSION", "INDEX_KINDS", "LOCK", "MANIFEST", "STORE", "AddReport", "CorpusIndex",
    "Hit", "IndexCorruptError", "IndexExistsError", "IndexNotFoundError",
]


@dataclass(frozen=True)
class Hit:
    """One document found by a search. ``score`` is the cosine similarity of its best passage (-1..1);
    ``start_char``/``end_char`` locate that passage in ``text`` (half-open, Python code points)."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    start_char: int = 0
    end_char: int = 0

    @property
    def passage(self) -> str:
        return self.text[self.start_char : self.end_char]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "start_char": self.start_char, "end_char": self.end_char,
                "metadata": self.metadata, "passage": self.passage}


@dataclass(frozen=True)
class AddReport:
    """What an ``add`` did. ``unchanged``: ids left out by ``skip_unchanged`` (already indexed as given)."""

    added: list[str]
    replaced: list[str]
    passages: int
    unchanged: list[str] = field(default_factory=list)


class CorpusIndex:
    """A folder holding a faiss index of document passages plus the documents themselves.

    Create with :meth:`create`, open with :meth:`open` (or :meth:`open_or_create`). Every mutating call (``add``,
    ``remove``, ``compact``) is one atomic save (``add`` with ``commit_every``: one per chunk). The embedding model
    is loaded only when something must be embedded (``add`` without ``embeddings``, ``search`` with a text query),
    so ``info``/``remove`` stay fast.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], embedder: Embedder | None, device: str | None):
        # Private: use create()/open().
        self.path = path
        self.manifest = manifest
        self._embedder = embedder
        self._device = device
        self._lock = threading.RLock()
        self._generations: Generations | None = None
        if embedder is not None:
            self._check_embedder(embedder)

    # ------------------------------------------------------------------ opening and creating

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        embedder: Embedder | None = None,
        model: str | os.PathLike | None = None,
        device: str | None = None,
        kind: str = "flat",
        dimension: int | None = None,
        passage_tokens: int = 128,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 512,
    ) -> CorpusIndex:
        """Create a new, empty index in ``path`` (created if missing; must not already hold an index).

        ``dimension`` lets callers who bring their own vectors create an index without loading the model;
        otherwise the model is loaded to learn it. HNSW: ``ef_search`` is the default search breadth (each search
        may override it); 512 rather than faiss's 16 or a common 64 because recall matters more than a
        millisecond before a grounding step that takes seconds: over 100k real-text passages, efSearch 128 kept
        0.87 of exact recall@10 and 512 kept 0.98 at 1.3 ms a search (``python -m cfic.retrieval.bench --real``).
        """
        from cfic.retrieval.embedder import DEFAULT_EMBEDDING_MODEL, get_embedder, resolve_embedding_model

        root = Path(path).expanduser()
        if kind not in INDEX_KINDS:
            raise CficError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
        for name, value in (("passage_tokens", passage_tokens), ("hnsw_m", hnsw_m),
                            ("ef_construction", ef_construction), ("ef_search", ef_search)):
            require_positive_int(name, value)
        check_creatable(root)
        if embedder is not None:
            name, model_path, dim = embedder.name, embedder.path, embedder.dimension
        else:
            model_path, name = resolve_embedding_model(model)
            dim = dimension
        if dim is None:
            embedder = get_embedder(model, device=device)
            dim = embedder.dimension
        require_positive_int("dimension", dim)
        manifest = new_manifest(
            name=name, model_path=None if name == DEFAULT_EMBEDDING_MODEL else str(model_path), dimension=dim,
            kind=kind, passage_tokens=passage_tokens,
            hnsw={"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search},
        )
        root.mkdir(parents=True, exist_ok=True)
        with folder_lock(root, shared=False):  # two creators racing: the second finds the first's manifest
            check_no_manifest(root)
            remove_leftovers(root)
            index = cls(root, manifest, embedder, device)
            index._generations = Generations.create(root, kind, dim, manifest["hnsw"])
            write_manifest(root, manifest)  # last: a folder without one is not an index yet
            return index

    @classmethod
    def open(cls, path: str | os.PathLike, *, embedder: Embedder | None = None,
             model: str | os.PathLike | None = None, device: str | None = None) -> CorpusIndex:
        """Open an existing index. ``model``/``embedder`` override the model recorded in the manifest; a model
        whose dimension differs from the index's is refused."""
        root = Path(path).expanduser()
        manifest = read_manifest(root)
        if embedder is None and model is not None:
            from cfic.retrieval.embedder import get_embedder

            embedder = get_embedder(model, device=device)
        index = cls(root, manifest, embedder, device)
        index._generations = Generations.open(root, index.kind, index.dimension, manifest.get("hnsw") or {})
        return index

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, **options: Any) -> CorpusIndex:
        """Open ``path`` if it holds an index, else create one there (``options`` as for :meth:`create`)."""
        root = Path(path).expanduser()
        if not (root / MANIFEST).is_file():
            with contextlib.suppress(IndexExistsError):  # another process may create it first
                return cls.create(root, **options)
        open_options = {k: options[k] for k in ("embedder", "model", "device") if k in options}
        index = cls.open(root, **open_options)
        kind = options.get("kind")
        if kind is not None and kind != index.kind:
            index.close()
            raise CficError(f"{root} is a {index.kind!r} index; it cannot be reopened as {kind!r}")
        return index

    def close(self) -> None:
        with self._lock:
            if self._generations is not None:
                self._generations.close()
                self._generations = None

    def __enter__(self) -> CorpusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def embedding_model(self) -> str:
        return str(self.manifest["embedding_model"])

    @property
    def embedder(self) -> Embedder:
        """The embedding model, loaded on first use from the manifest's record (or the one given at open)."""
        with self._lock:
            if self._embedder is None:
                from cfic.errors import ModelLoadError
                from cfic.retrieval.embedder import get_embedder

                model = self.manifest.get("embedding_model_path")
                if model is not None and not Path(model).is_dir():
                    raise ModelLoadError(
                        f"the index was built with {self.embedding_model!r} from {model}, which no longer exists; "
                        "pass the model folder explicitly"
                    )
                embedder = get_embedder(model, device=self._device)
                self._check_embedder(embedder)
                self._embedder = embedder
            return self._embedder

    def _check_embedder(self, embedder: Embedder) -> None:
        if embedder.dimension != self.dimension:
            raise CficError(
                f"embedding dimension mismatch: the index at {self.path} holds {self.dimension}-dimensional vectors "
                f"({self.embedding_model}), but the model {embedder.name!r} makes {embedder.dimension}-dimensional "
                "ones; use the model the index was built with, or a new index"
            )
        if embedder.name != self.embedding_model:
            warnings.warn(
                f"the index was built with {self.embedding_model!r} but {embedder.name!r} is in use; "
                "scores are only meaningful with the same model",
                stacklevel=3,
            )

    def __len__(self) -> int:
        with self._lock:
            return self._opened().store.count_documents()

    def __contains__(self, doc_id: object) -> bool:
        with self._lock:
            return self._opened().store.contains(doc_id)

    def ids(self) -> list[str]:
        with self._lock:
            return self._opened().store.ids()

    def get(self, doc_id: str) -> Document | None:
        """The stored document, whole, or None."""
        docs = self.get_many([doc_id])
        return docs[0] if docs else None

    def get_many(self, ids: Sequence[str]) -> list[Document]:
        """Stored documents in the order of ``ids``; unknown ids are left out."""
        with self._lock:
            found = self._opened().store.documents(dict.fromkeys(ids))
        return [found[i] for i in ids if i in found]

    # ------------------------------------------------------------------ mutations

    def add(
        self,
        documents: Iterable[Any],
        *,
        embeddings: np.ndarray | None = None,
        progress: bool = False,
        commit_every: int | None = None,
        skip_unchanged: bool = False,
    ) -> AddReport:
        """Add documents; a document whose id is already indexed is replaced. One atomic save by default.

        Documents are str (id: a hash of the text), ``{"id", "text", "metadata"}`` dicts, ``cfic.Document`` or
        LangChain ``Document`` (see :func:`cfic.documents.as_document`); metadata must be JSON-serialisable.

        ``embeddings`` (shape ``(n_documents, dimension)``) skips the model: each document then gets exactly that
        one vector (normalised here). ``progress`` shows a bar (passages embedded, rate, time left) while embedding.

        ``commit_every``: embed and save that many documents at a time, each save atomic on its own, so a kill or a
        failure part-way through a large add keeps every chunk saved before it (embedding 100k documents on a CPU
        takes the better part of an hour; one save at the end would lose all of it). Each save rewrites the faiss
        file, so chunks should be thousands of documents, not tens. ``skip_unchanged`` leaves out documents that
        are already indexed under the same id with the same text and metadata (``AddReport.unchanged``): running
        an interrupted add again then embeds only what it had not saved.
        """
        if commit_every is not None:
            require_positive_int("commit_every", commit_every)
        doc_list, rows, n_items = _unique_documents(documents)
        vectors: np.ndarray | None = None
        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float32)
            if embeddings.ndim != 2 or len(embeddings) != n_items:
                raise CficError("embeddings must be a 2-d array with one row per document")
            vectors = unit_rows(embeddings[rows], self.dimension, "embeddings")
        unchanged: list[str] = []
        if skip_unchanged and doc_list:
            same = self._unchanged_ids(doc_list)
            if same:
                keep = [i for i, d in enumerate(doc_list) if d.id not in same]
                unchanged = [d.id for d in doc_list if d.id in same]
                doc_list = [doc_list[i] for i in keep]
                vectors = vectors[keep] if vectors is not None else None
        if not doc_list:
            return AddReport([], [], 0, unchanged)
        if vectors is None:
            budget = min(int(self.manifest.get("passage_tokens", 128)), self.embedder.max_tokens)
            spans, owners, texts = split_documents(doc_list, self.embedder.count_tokens, budget)
        else:
            spans, owners, texts = [(0, len(d.text)) for d in doc_list], list(range(len(doc_list))), []
        bar = None
        if progress and vectors is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit="passage", desc="embedding", leave=False, disable=None)
        step = commit_every or len(doc_list)
        added: list[str] = []
        replaced: list[str] = []
        saved = 0
        try:
            for lo in range(0, len(doc_list), step):
                hi = min(lo + step, len(doc_list))
                # owners is non-decreasing: the passages of documents lo..hi-1 are one slice.
                a, b = bisect.bisect_left(owners, lo), bisect.bisect_left(owners, hi)
                chunk_vectors = (vectors[lo:hi] if vectors is not None
                                 else self.embedder.embed(texts[a:b], progress=bar))
                existing = self._save_documents(doc_list[lo:hi], spans[a:b], [o - lo for o in owners[a:b]],
                                                chunk_vectors)
                added += [d.id for d in doc_list[lo:hi] if d.id not in existing]
                replaced += sorted(existing)
                saved = hi
        except BaseException as exc:
            if saved:
                exc.add_note(f"{saved} of {len(doc_list)} documents were saved before this")
                exc.add_note("adding the same documents again with skip_unchanged=True adds only the rest")
            raise
        finally:
            if bar is not None:
                bar.close()
        return AddReport(added, sorted(replaced), len(owners), unchanged)

    def _unchanged_ids(self, docs: list[Document]) -> set[str]:
        """Ids of ``docs`` already stored with the same text and metadata."""
        with self._lock:
            stored = self._opened().store.documents(d.id for d in docs)
        return {d.id for d in docs if d.id in stored and stored[d.id].text == d.text
                and stored[d.id].metadata == d.metadata}

    def _save_documents(self, docs: list[Document], spans: list[tuple[int, int]], owners: list[int],
                        embeddings: np.ndarray) -> set[str]:
        """One atomic save of ``docs`` with their passages (``owners`` index ``docs``, ``embeddings`` are the
        passages' unit vectors); returns the ids that replaced documents already indexed."""
        with self._writing() as state:
            existing = state.store.present(d.id for d in docs)
            first = state.store.next_vid()
            vids = np.arange(first, first + len(owners), dtype=np.int64)

            def change(store: DocumentStore, vectors: PassageVectors) -> None:
                drop_documents(store, vectors, sorted(existing))
                vectors.add(embeddings, vids)
                store.insert(docs, spans, owners, vids)

            state.save(change)
        return existing

    def remove(self, ids: Iterable[str]) -> list[str]:
        """Remove documents by id; returns the ids that were present (unknown ids are ignored)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._writing() as state:
            found = state.store.present(wanted)
            present = [doc_id for doc_id in wanted if doc_id in found]
            if not present:
                return []
            state.save(lambda store, vectors: drop_documents(store, vectors, present))
        return present

    def compact(self) -> None:
        """Rebuild an HNSW graph from its live vectors, dropping tombstones (a no-op for flat indexes)."""
        with self._writing() as state:
            if self.kind == "hnsw" and len(state.vectors.dead):
                state.save(compact)

    # ------------------------------------------------------------------ search

    def search(self, query: str | np.ndarray, k: int = 5, *, ef_search: int | None = None) -> list[Hit]:
        """The ``k`` documents whose best passage is most similar to ``query`` (a text, or a query vector)."""
        require_positive_int("k", k)
        query_vector = self._query_vector(query)
        with self._reading() as state:
            store, vectors = state.store, state.vectors
            live = vectors.live
            if live <= 0:
                return []
            fetch = min(live, max(4 * k, k + 16))
            while True:  # more passages until k distinct documents are among them (or nothing is left)
                found = vectors.search(query_vector, fetch, ef_search)
                where = store.passages(vid for _, vid in found)
                best: dict[str, tuple[float, int, int]] = {}
                for score, vid in found:  # scores come best first: the first passage seen is a document's best
                    if vid in where and where[vid][0] not in best:
                        doc_id, a, b = where[vid]
                        best[doc_id] = (score, a, b)
                if len(best) >= k or fetch >= live:
                    break
                fetch = min(live, fetch * 4)
            top = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
            docs = store.documents(doc_id for doc_id, _ in top)
        return [Hit(doc_id, score, docs[doc_id].text, docs[doc_id].metadata, a, b)
                for doc_id, (score, a, b) in top if doc_id in docs]

    def _query_vector(self, query: str | np.ndarray) -> np.ndarray:
        """The query as one unit float32 row: embedded when it is a text, normalised when it is a vector."""
        if isinstance(query, str):
            if not query.strip():
                raise EmptyQueryError("the query is empty")
            vector = self.embedder.embed_query(query)
        else:
            vector = np.asarray(query, dtype=np.float32).reshape(-1)
            if vector.shape[0] != self.dimension:
                raise CficError(f"query vector has dimension {vector.shape[0]}, the index {self.dimension}")
            vector = unit_rows(vector.reshape(1, -1), self.dimension, "query vector")
        return np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        with self._reading() as state:
            store = state.store
            out = {
                "path": str(self.path),
                "kind": self.kind,
                "embedding_model": self.embedding_model,
                "embedding_model_path": self.manifest.get("embedding_model_path"),
                "dimension": self.dimension,
                "documents": store.count_documents(),
                "vectors": store.count_passages(),
                "tombstones": len(state.vectors.dead),
                "passage_tokens": self.manifest.get("passage_tokens"),
                "generation": state.generation,
                "bytes_on_disk": sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()),
                "created_at": _iso(self.manifest.get("created_at")),
            }
            if self.kind == "hnsw":
                out["hnsw"] = dict(self.manifest.get("hnsw") or {})
            return out

    # ------------------------------------------------------------------ internals

    def _opened(self) -> Generations:
        if self._generations is None:
            raise CficError("the index is closed")
        return self._generations

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Generations]:
        """The index's lock and the newest saved generation: what every read starts from."""
        with self._lock:
            state = self._opened()
            state.sync()
            yield state

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Generations]:
        """The index's lock, the folder's exclusive lock and the newest saved generation: what every change
        starts from (changes made on an older generation would drop another process's save)."""
        with self._lock:
            state = self._opened()
            with state.lock(shared=False):
                state.refresh()
                yield state

    def _db(self) -> sqlite3.Connection:
        """The store's SQLite connection, for looking inside (tests, debugging)."""
        return self._opened().store.conn


def _unique_documents(items: Iterable[Any]) -> tuple[list[Document], list[int], int]:
    """The documents to add, one per id (the last occurrence of an id wins, as a later add would), with the row
    each came from (to pick its embedding) and the number of items given."""
    docs: dict[str, tuple[Document, int]] = {}
    n_items = 0
    for row, item in enumerate(items):
        n_items = row + 1
        doc = as_document(item, row, default_id=content_id)
        try:
            json.dumps(doc.metadata)  # the store keeps metadata as JSON
        except (TypeError, ValueError) as exc:
            raise CficError(f"document {doc.id!r}: metadata is not JSON-serialisable: {exc}") from exc
        docs.pop(doc.id, None)
        docs[doc.id] = (doc, row)
    return [d for d, _ in docs.values()], [r for _, r in docs.values()], n_items


def _iso(epoch: Any) -> str | None:
    if not isinstance(epoch, (int, float)):
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")

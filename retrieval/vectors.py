"""The faiss side of a corpus index: one vector per passage, under the passage's vector id.

Kinds: ``flat`` (exact inner product, ``IndexIDMap2(IndexFlatIP)``) and ``hnsw`` (approximate,
``IndexIDMap2(IndexHNSWFlat)``, no training needed). HNSW cannot delete vectors, so removed or replaced vectors are
kept as tombstones that searches skip (a faiss ``IDSelector``), and the graph is rebuilt from the live vectors when
tombstones pass a quarter of the index (or on ``compact()``). The tombstones are persisted by the store; this module
only keeps them in memory next to the graph they belong to.

faiss is imported inside the functions, so that opening the index module stays cheap for commands that never search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.files import write_atomic
from cfic.retrieval.folder import IndexCorruptError

# Tombstones past this fraction of an HNSW index trigger a rebuild: searches skip them, but they still cost time.
COMPACT_FRACTION = 0.25


def unit_rows(vectors: Any, dimension: int, what: str) -> np.ndarray:
    """``vectors`` (n x dimension) as unit float32 rows, refused when they cannot be: wrong width, zero or NaN. Unit
    length makes faiss's inner product the cosine similarity the index promises."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != dimension:
        raise CficError(f"{what} must have shape (n, {dimension}), got {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise CficError(f"{what} must be finite and non-zero")
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def faiss_ids(index: Any) -> np.ndarray:
    """The external ids held by an ``IndexIDMap``/``IndexIDMap2``."""
    import faiss

    return faiss.vector_to_array(index.id_map).astype(np.int64)


class PassageVectors:
    """A faiss index of passage vectors and, for HNSW, the ids of its tombstoned vectors.

    ``hnsw`` holds the graph's ``m``, ``ef_construction`` and default ``ef_search`` (the manifest's record)."""

    def __init__(self, index: Any, kind: str, dimension: int, hnsw: dict[str, int], dead: np.ndarray):
        self.index = index
        self.kind = kind
        self.dimension = dimension
        self.hnsw = hnsw
        self.dead = dead

    @classmethod
    def empty(cls, kind: str, dimension: int, hnsw: dict[str, int]) -> PassageVectors:
        return cls(_new_faiss(kind, dimension, hnsw), kind, dimension, hnsw, np.empty(0, dtype=np.int64))

    @classmethod
    def read(cls, path: Path, kind: str, dimension: int, hnsw: dict[str, int], dead: np.ndarray,
             n_passages: int) -> PassageVectors:
        """The faiss file at ``path``, checked against what the store says it must hold."""
        import faiss

        if not path.is_file():
            raise IndexCorruptError(f"{path} is missing")
        try:
            index = faiss.read_index(str(path))
        except (OSError, RuntimeError) as exc:
            raise IndexCorruptError(f"{path} is corrupt: {str(exc).splitlines()[0][:200]}") from exc
        if index.d != dimension:
            raise IndexCorruptError(f"{path} holds {index.d}-dimensional vectors but the manifest says {dimension}")
        if index.ntotal != n_passages + len(dead):
            raise IndexCorruptError(
                f"{path.parent}: the faiss file has {index.ntotal} vectors but the store expects "
                f"{n_passages + len(dead)}; the index is corrupt"
            )
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexCorruptError(f"{path} is a faiss {type(index).__name__}, not a cfic index")
        return cls(index, kind, dimension, hnsw, dead)

    def write(self, path: Path) -> None:
        """Straight from faiss to a temp file, then renamed into place (no in-memory copy of a large index)."""
        import faiss

        index = self.index
        write_atomic(path, lambda tmp: faiss.write_index(index, tmp))

    @property
    def total(self) -> int:
        """Vectors held, tombstones included."""
        return int(self.index.ntotal)

    @property
    def live(self) -> int:
        return self.total - len(self.dead)

    def ids(self) -> np.ndarray:
        return faiss_ids(self.index)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(ids)

    def add(self, vectors: np.ndarray, vids: np.ndarray) -> None:
        if len(vids):
            self.index.add_with_ids(vectors, vids)

    def drop(self, vids: np.ndarray) -> np.ndarray:
        """Remove ``vids`` (flat) or tombstone them (HNSW); returns the newly tombstoned ids, for the store."""
        if not len(vids):
            return vids
        if self.kind == "flat":
            import faiss

            self.index.remove_ids(faiss.IDSelectorBatch(vids))
            return np.empty(0, dtype=np.int64)
        self.dead = np.union1d(self.dead, vids).astype(np.int64)
        return vids

    def needs_compaction(self) -> bool:
        return self.kind == "hnsw" and len(self.dead) > COMPACT_FRACTION * max(self.total, 1)

    def compact(self) -> None:
        """Rebuild the graph from the live vectors only; the caller clears the store's tombstones alike."""
        live = np.setdiff1d(self.ids(), self.dead).astype(np.int64)
        vectors = self.reconstruct(live) if len(live) else np.empty((0, self.dimension), np.float32)
        fresh = _new_faiss(self.kind, self.dimension, self.hnsw)
        if len(live):
            fresh.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), live)
        self.index = fresh
        self.dead = np.empty(0, dtype=np.int64)

    def search(self, vector: np.ndarray, k: int, ef_search: int | None) -> list[tuple[float, int]]:
        """(score, vector id) of the ``k`` nearest live vectors to one unit ``vector`` (1 x dimension), best first.

        One query on one OpenMP thread: faiss parallelises over queries, so a single query gains nothing from more
        threads, while waking them costs ~10 ms per search on a busy machine (measured: 0.2 ms vs 10 ms at load 4
        on 2 cores). ``omp_set_num_threads`` only affects the calling thread, so other threads keep their setting.
        """
        import faiss

        params = self._search_params(ef_search)
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, labels = self.index.search(vector, k, params=params)
        finally:
            faiss.omp_set_num_threads(previous)
        return [(float(s), int(v)) for s, v in zip(scores[0], labels[0], strict=True) if v >= 0]

    def _search_params(self, ef_search: int | None) -> Any:
        import faiss

        if self.kind != "hnsw":
            return None
        ef = int(ef_search or self.hnsw["ef_search"])
        if not len(self.dead):
            return faiss.SearchParametersHNSW(efSearch=ef)
        # Built through the keyword constructor, which keeps the selectors alive as long as the parameters.
        return faiss.SearchParametersHNSW(efSearch=ef, sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(self.dead)))


def _new_faiss(kind: str, dimension: int, hnsw: dict[str, int]) -> Any:
    import faiss

    if kind == "flat":
        inner = faiss.IndexFlatIP(dimension)
    else:
        inner = faiss.IndexHNSWFlat(dimension, int(hnsw["m"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(hnsw["ef_construction"])
        inner.hnsw.efSearch = int(hnsw["ef_search"])
    return faiss.IndexIDMap2(inner)

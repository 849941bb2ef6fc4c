"""A thin wrapper over ``bm25s`` (a maintained BM25 package) shared by the NQ distractor builder and the
``bm25`` baseline, so both rank text the same way: lower-cased word tokens, English stopwords removed, no
stemming."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np


class BM25:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over a fixed list of texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        # bm25s sets its own logger to DEBUG, so every index build printed "Building index from IDs objects" through
        # the root handler (once per example in `cfic evaluate`). Its warnings still show; a user may lower it again.
        if logging.getLogger("bm25s").level == logging.DEBUG:
            logging.getLogger("bm25s").setLevel(logging.WARNING)
        self._bm25s = bm25s
        self.size = len(texts)
        self._index = bm25s.BM25()
        if self.size:
            tokens = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
            self._index.index(tokens, show_progress=False)

    def _query_tokens(self, queries: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)

    def rank(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """For each query, the indices of the ``k`` best texts, best first (ties in a deterministic order)."""
        k = min(k, self.size)
        if k <= 0 or not queries:
            return [[] for _ in queries]
        tokens = self._query_tokens(queries)
        # bm25s rejects an all-empty query batch; such queries simply score 0 everywhere.
        if not any(tokens):
            return [list(range(k)) for _ in queries]
        docs, _ = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[int(i) for i in row] for row in np.asarray(docs)]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every text for one query (zeros when the query has no indexable words)."""
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        tokens = self._query_tokens([query])[0]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._index.get_scores(tokens), dtype=np.float32)

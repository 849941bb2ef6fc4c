"""LangChain components: ``CFICRetriever`` (faiss finds documents, CFIC grounds evidence in them) and
``CFICCompressor`` (a drop-in for ``LLMChainExtractor`` in ``ContextualCompressionRetriever``).

Both return one ``Document`` per evidence span. Unlike an LLM extractor, the span is verbatim by construction:
``page_content == source_text[start_char:end_char]`` (Python code points), checked here before it is returned.
Metadata: the source document's own metadata, then ``source_id``, ``start_char``, ``end_char``, ``score``,
``sentence_start``, ``sentence_end``, ``end_probability`` (and ``retrieval_score`` when an index found the source);
these keys win over source metadata of the same name. The ``Document.id`` is ``"{source_id}:{start}-{end}"``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor
from langchain_core.documents import Document as LCDocument
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from cfic.documents import as_document
from cfic.errors import CficError, require_positive_int
from cfic.types import Document

__all__ = ["CFICCompressor", "CFICRetriever"]

# Loaded once per process when a component is built without a grounder: the default model is ~500 MB.
_DEFAULT_GROUNDER: Any = None
_DEFAULT_LOCK = threading.Lock()


def _default_grounder() -> Any:
    global _DEFAULT_GROUNDER
    with _DEFAULT_LOCK:
        if _DEFAULT_GROUNDER is None:
            from cfic.grounder import Grounder

            _DEFAULT_GROUNDER = Grounder.from_pretrained()
        return _DEFAULT_GROUNDER


def _evidence_documents(result: Any, sources: Sequence[Document], extra: Sequence[dict[str, Any]] | None = None
                        ) -> list[LCDocument]:
    out: list[LCDocument] = []
    for ev in result.evidence:
        source = sources[ev.document_index]
        if source.text[ev.start_char : ev.end_char] != ev.text:  # the contract every user relies on
            raise RuntimeError(f"evidence for {source.id!r} is not verbatim at {ev.start_char}-{ev.end_char}")
        metadata = {
            **source.metadata,
            **(extra[ev.document_index] if extra else {}),
            "source_id": source.id,
            "start_char": ev.start_char,
            "end_char": ev.end_char,
            "score": ev.score,
            "sentence_start": ev.sentence_start,
            "sentence_end": ev.sentence_end,
            "end_probability": ev.end_probability,
        }
        out.append(LCDocument(page_content=ev.text, metadata=metadata,
                              id=f"{source.id}:{ev.start_char}-{ev.end_char}"))
    return out


class CFICRetriever(BaseRetriever):
    """Retrieve verbatim evidence: the ``fetch_k`` best documents of a corpus index, then CFIC grounding in them.

    Built over an index (``index=CorpusIndex`` or a folder path) or over documents passed in directly
    (``documents=[...]``, no index: every document is grounded, and with ``cache_encodings`` each is read by the
    model once and its encoding reused for every later query). Returns at most ``k`` evidence spans, best first.

    >>> retriever = CFICRetriever.from_index("corpus-index", k=3)        # doctest: +SKIP
    >>> retriever.invoke("When did the Normans conquer England?")       # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    grounder: Any = None
    """A ``cfic.Grounder``; None loads the default model on first use (once per process)."""
    index: Any = None
    """A ``cfic.retrieval.CorpusIndex`` or the path of an index folder (opened on first use)."""
    documents: list[Any] | None = None
    """Documents to ground in directly, instead of an index: str, dict, cfic or LangChain Documents."""
    k: int = 4
    """How many evidence spans to return."""
    fetch_k: int = 4
    """How many documents to take from the index per query (all of ``documents`` are grounded)."""
    threshold: float | None = None
    """Drop spans scoring below this (0..1); None uses the grounder's configuration."""
    min_retrieval_score: float | None = None
    """Index mode: documents whose best passage is less similar than this (cosine, -1..1) are not grounded.
    Grounding scores rank spans across documents on their own, so a weak match can otherwise outrank the
    document the index found first."""
    max_span_tokens: int | None = None
    """Longest evidence span in tokens; None uses the grounder's configuration."""
    abstain: bool | None = None
    """Return nothing when the abstention model judges that the documents do not answer the query; None
    follows the model's settings (the bundled model ships with abstention off)."""
    skip_decoding: bool = True
    use_attention: bool = True
    """False ranks start sentences by the sentence prior alone (better on one long single-topic article)."""
    hops: int = 1
    """2: a second search with the first evidence in the question (multi-hop questions)."""
    cache_encodings: bool = True
    """For ``documents``: keep each document's encoding (its KV prefix) for reuse across queries."""

    _sources: list[Document] | None = PrivateAttr(default=None)
    _encodings: list[Any] | None = PrivateAttr(default=None)
    _init_lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> CFICRetriever:
        if (self.index is None) == (self.documents is None):
            raise CficError("give either index= or documents=, not both and not neither")
        require_positive_int("k", self.k)
        require_positive_int("fetch_k", self.fetch_k)
        if self.documents is not None:
            if not self.documents:
                raise CficError("documents is empty")
            sources = [as_document(d, i) for i, d in enumerate(self.documents)]
            seen: set[str] = set()
            for s in sources:
                if s.id in seen:
                    raise CficError(f"two documents have the id {s.id!r}")
                seen.add(s.id)
            self._sources = sources
        return self

    @classmethod
    def from_index(cls, index: Any, grounder: Any = None, **kwargs: Any) -> CFICRetriever:
        """Over a ``CorpusIndex`` or an index folder."""
        return cls(index=index, grounder=grounder, **kwargs)

    @classmethod
    def from_documents(cls, documents: Sequence[Any], grounder: Any = None, **kwargs: Any) -> CFICRetriever:
        """Over documents passed in directly (no index)."""
        return cls(documents=list(documents), grounder=grounder, **kwargs)

    # ---------------------------------------------------------------- lazy state
    def _grounder(self) -> Any:
        if self.grounder is None:
            with self._init_lock:
                if self.grounder is None:
                    self.grounder = _default_grounder()
        return self.grounder

    def _index(self) -> Any:
        if isinstance(self.index, (str, os.PathLike)):
            with self._init_lock:
                if isinstance(self.index, (str, os.PathLike)):
                    from cfic.retrieval.index import CorpusIndex

                    self.index = CorpusIndex.open(Path(self.index))
        return self.index

    def _document_inputs(self) -> list[Any]:
        assert self._sources is not None
        if not self.cache_encodings:
            return list(self._sources)
        with self._init_lock:
            if self._encodings is None:
                self._encodings = self._grounder().encode(self._sources)
            return self._encodings

    # ---------------------------------------------------------------- retrieval
    def retrieve(self, query: str, *, k: int | None = None, fetch_k: int | None = None) -> list[LCDocument]:
        """The work behind ``invoke``: search (index mode), ground, convert. Blocking."""
        k = self.k if k is None else k
        fetch_k = self.fetch_k if fetch_k is None else fetch_k
        require_positive_int("k", k)
        require_positive_int("fetch_k", fetch_k)
        grounder = self._grounder()
        options = {"top_k": k, "max_span_tokens": self.max_span_tokens, "threshold": self.threshold,
                   "abstain": self.abstain, "skip_decoding": self.skip_decoding,
                   "use_attention": self.use_attention, "hops": self.hops}
        if self._sources is not None:
            result = grounder.ground(query, self._document_inputs(), **options)
            return _evidence_documents(result, self._sources)[:k]
        if not isinstance(query, str) or not query.strip():
            from cfic.errors import EmptyQueryError

            raise EmptyQueryError("the query is empty")
        hits = self._index().search(query, k=fetch_k)
        if self.min_retrieval_score is not None:
            hits = [h for h in hits if h.score >= self.min_retrieval_score]
        if not hits:
            return []
        sources = [as_document({"id": h.id, "text": h.text, "metadata": h.metadata}, i) for i, h in enumerate(hits)]
        result = grounder.ground(query, sources, **options)
        extra = [{"retrieval_score": h.score} for h in hits]
        return _evidence_documents(result, sources, extra)[:k]

    @staticmethod
    def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = {key: value for key, value in kwargs.items() if key != "verbose"}
        unknown = set(kwargs) - {"k", "fetch_k"}
        if unknown:
            raise CficError(f"unknown retriever option(s): {', '.join(sorted(unknown))}")
        return kwargs

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[LCDocument]:
        return self.retrieve(query, **self._options(kwargs))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[LCDocument]:
        # Model forward passes and faiss are blocking: a worker thread keeps the event loop free.
        return await asyncio.to_thread(self.retrieve, query, **self._options(kwargs))


class CFICCompressor(BaseDocumentCompressor):
    """Keep only the verbatim evidence of retrieved documents: a drop-in for ``LLMChainExtractor``.

    >>> from langchain_classic.retrievers import ContextualCompressionRetriever       # doctest: +SKIP
    >>> ContextualCompressionRetriever(base_compressor=CFICCompressor(grounder=g),    # doctest: +SKIP
    ...                                base_retriever=vectorstore.as_retriever())

    Returns one Document per evidence span, best first, across all input documents (at most ``k``; None uses the
    grounder's ``top_k``). A source's id is its ``Document.id``, or its position in the input when it has none.
    Documents with empty text are passed over; no evidence gives an empty list.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    grounder: Any = None
    """A ``cfic.Grounder``; None loads the default model on first use (once per process)."""
    k: int | None = Field(default=None)
    threshold: float | None = None
    max_span_tokens: int | None = None
    abstain: bool | None = None
    skip_decoding: bool = True
    use_attention: bool = True
    hops: int = 1

    @model_validator(mode="after")
    def _check(self) -> CFICCompressor:
        if self.k is not None:
            require_positive_int("k", self.k)
        return self

    def compress_documents(
        self,
        documents: Sequence[LCDocument],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> list[LCDocument]:
        sources = [as_document(d, i, allow_empty=True) for i, d in enumerate(documents)]
        sources = [s for s in sources if s.text.strip()]
        if not sources:
            return []
        grounder = self.grounder if self.grounder is not None else _default_grounder()
        result = grounder.ground(query, sources, top_k=self.k, max_span_tokens=self.max_span_tokens,
                                 threshold=self.threshold, abstain=self.abstain,
                                 skip_decoding=self.skip_decoding, use_attention=self.use_attention,
                                 hops=self.hops)
        return _evidence_documents(result, sources)

    async def acompress_documents(
        self,
        documents: Sequence[LCDocument],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> list[LCDocument]:
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks)

"""cfic.retrieval: a persistent faiss index of whole documents, and LangChain components that ground in them.

Imports are lazy: ``import cfic`` must not pull in faiss, torch or langchain.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AddReport", "CFICCompressor", "CFICRetriever", "CorpusIndex", "Embedder", "Hit", "get_embedder"]

_WHERE = {
    "AddReport": "cfic.retrieval.index",
    "CorpusIndex": "cfic.retrieval.index",
    "Hit": "cfic.retrieval.index",
    "Embedder": "cfic.retrieval.embedder",
    "get_embedder": "cfic.retrieval.embedder",
    "CFICRetriever": "cfic.retrieval.langchain",
    "CFICCompressor": "cfic.retrieval.langchain",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'cfic.retrieval' has no attribute {name!r}")

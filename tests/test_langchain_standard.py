"""LangChain's own standard retriever tests (``langchain-tests``) against CFICRetriever, over a faiss index and
over documents passed in directly. The tiny random-weight grounder keeps them fast; the evidence is still real
(verbatim spans picked by the real decoding code)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from cfic.retrieval.embedder import get_embedder
from cfic.retrieval.index import CorpusIndex
from cfic.retrieval.langchain import CFICRetriever

CORPUS = [
    {"id": "normans", "text": "The Normans came from Normandy in northern France. In 1066 William the Conqueror "
     "invaded England. He won the Battle of Hastings. He was crowned at Westminster on Christmas Day."},
    {"id": "cats", "text": "Cats are small carnivorous mammals. A cat sleeps up to sixteen hours a day. "
     "Cats were domesticated in the Near East."},
    {"id": "python", "text": "Python is a programming language. Guido van Rossum created it. Python 3.0 was "
     "released in December 2008."},
    {"id": "volcano", "text": "Mount Vesuvius erupted in 79 AD. The eruption buried Pompeii. Pliny the Younger "
     "described it in two letters."},
]


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory):
    index = CorpusIndex.create(tmp_path_factory.mktemp("standard") / "idx", embedder=get_embedder())
    index.add(CORPUS)
    return index


class TestCFICRetrieverOverIndex(RetrieversIntegrationTests):
    _params: dict[str, Any] = {}

    @pytest.fixture(autouse=True)
    def _bind(self, tiny_grounder, corpus_index):
        # The standard suite reads constructor params from a property, so the fixtures are bound here first.
        type(self)._params = {"index": corpus_index, "grounder": tiny_grounder, "k": 2}

    @property
    def retriever_constructor(self) -> type[CFICRetriever]:
        return CFICRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def retriever_query_example(self) -> str:
        return "When did William the Conqueror invade England?"


class TestCFICRetrieverOverDocuments(RetrieversIntegrationTests):
    _params: dict[str, Any] = {}

    @pytest.fixture(autouse=True)
    def _bind(self, tiny_grounder):
        type(self)._params = {"documents": CORPUS, "grounder": tiny_grounder, "k": 2}

    @property
    def retriever_constructor(self) -> type[CFICRetriever]:
        return CFICRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def retriever_query_example(self) -> str:
        return "How long does a cat sleep?"

"""The service with a corpus index: requests may omit `documents`, and the response carries the documents the index
supplied, so the offset invariant can be checked against them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cfic.api.app import create_app
from cfic.api.settings import ServiceSettings

CORPUS = [
    {"id": "normans", "text": "The Normans conquered England in 1066. William the Conqueror was crowned on Christmas "
                              "Day. Many castles were built afterwards.", "metadata": {"topic": "history"}},
    {"id": "bread", "text": "Bread is made from flour, water and yeast. The dough rises before baking."},
    {"id": "tides", "text": "Tides are caused by the gravity of the Moon. There are two high tides a day."},
]


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory):
    pytest.importorskip("faiss")
    from cfic.retrieval.index import CorpusIndex

    index = CorpusIndex.create(tmp_path_factory.mktemp("index") / "idx")
    index.add(CORPUS)
    yield index
    index.close()


def test_documents_come_from_the_index_when_omitted(tiny_grounder, corpus_index):
    app = create_app(tiny_grounder, index=corpus_index, settings=ServiceSettings(max_documents=4))
    with TestClient(app) as c:
        assert c.get("/readyz").json()["index_documents"] == len(CORPUS)
        schema = c.get("/openapi.json").json()["components"]["schemas"]["GroundRequest"]
        assert "documents" not in schema.get("required", []) and "top_documents" in schema["properties"]

        r = c.post("/ground", json={"query": "Who conquered England in 1066?", "top_documents": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        docs = body["documents"]
        assert len(docs) == 2
        assert docs[0]["id"] == "normans"  # the embedder ranks the matching document first
        assert docs[0]["metadata"] == {"topic": "history"}
        by_id = {d["id"]: d["text"] for d in CORPUS}
        for d in docs:
            assert d["text"] == by_id[d["id"]]
        for ev in body["evidence"]:
            doc = docs[ev["document_index"]]
            assert ev["document_id"] == doc["id"]
            assert ev["text"] == doc["text"][ev["start_char"]:ev["end_char"]]

        # Documents sent with the request take precedence over the index, and no `documents` echo comes back.
        own = c.post("/ground", json={"query": "What is bread made of?", "documents": [{"text": "Just this. Only."}]})
        assert own.status_code == 200 and own.json()["documents"] is None
        # Asking the index for more documents than a request may hold is refused by the schema.
        assert c.post("/ground", json={"query": "q", "top_documents": 5}).status_code == 422


def test_without_an_index_documents_are_required(tiny_grounder):
    with TestClient(create_app(tiny_grounder)) as c:
        schema = c.get("/openapi.json").json()["components"]["schemas"]["GroundRequest"]
        assert "documents" in schema["required"] and "top_documents" not in schema["properties"]
        r = c.post("/ground", json={"query": "q"})
        assert r.status_code == 422 and "documents" in r.json()["message"]
        assert c.post("/ground", json={"query": "q", "documents": [{"text": "A."}], "top_documents": 1}) \
            .status_code == 422

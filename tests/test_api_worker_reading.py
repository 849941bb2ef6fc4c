"""The REST worker reads documents best first (issue #29): with the LM-free start search (prior LM weight 0) a
request whose evidence lies in one of its documents prefills -- and caches -- only the documents the grounder
needed, and its evidence is what reading every document gives. No part of cfic is mocked: what was read is
measured by the encoding cache's contents and the response's usage."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cfic.api.app import create_app
from cfic.api.cache import encoding_cache_key
from cfic.api.settings import ServiceSettings
from cfic.config import GroundingConfig
from cfic.grounder import Grounder
from cfic.prior import PriorWeights

QUERY = "Which river flows through London?"
RIVER = {"id": "river", "text": "The river Thames flows through London. Boats carry goods along the river."}
DOCUMENTS = [
    RIVER,
    {"id": "cake", "text": "Flour, eggs and butter make a cake. Bake it for forty minutes."},
    {"id": "chess", "text": "Chess openings control the centre early. Knights move in an L shape."},
    {"id": "tax", "text": "Income tax is due every April. Receipts must be kept for six years."},
    {"id": "tulips", "text": "Tulips bloom in spring. Gardeners plant the bulbs in autumn."},
]


@pytest.fixture(scope="module")
def lazy_grounder(tiny_loaded):
    """LM weight 0: the prior alone picks the starts, so the grounder may read documents best first."""
    return Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0)))


@pytest.fixture(scope="module")
def read_all_grounder(tiny_loaded, lazy_grounder):
    return Grounder(tiny_loaded, lazy_grounder.config.with_options(read_all_documents=True),
                    sentence_prior=lazy_grounder.sentence_prior)


def ground(grounder, body: dict) -> tuple[dict, object]:
    """One request through a fresh service; its answer and the service's encoding cache."""
    app = create_app(grounder, settings=ServiceSettings(max_documents=len(DOCUMENTS)))
    with TestClient(app) as client:
        r = client.post("/ground", json=body)
    assert r.status_code == 200, r.text
    return r.json(), app.state.cache


def evidence(body: dict) -> list[tuple]:
    return [(e["document_index"], e["document_id"], e["start_char"], e["end_char"], e["text"])
            for e in body["evidence"]]


def test_a_request_prefills_and_caches_only_the_documents_the_grounder_reads(lazy_grounder, read_all_grounder):
    body = {"query": QUERY, "documents": DOCUMENTS, "top_k": 1, "abstain": False}
    lazy, lazy_cache = ground(lazy_grounder, body)
    full, full_cache = ground(read_all_grounder, body)

    # The same evidence as reading every document, from the one document that holds the query's words.
    assert evidence(lazy) == evidence(full) and evidence(lazy)[0][1] == "river"
    assert [e["score"] for e in lazy["evidence"]] == pytest.approx([e["score"] for e in full["evidence"]],
                                                                   rel=1e-5)
    assert lazy["usage"]["input_tokens"] < full["usage"]["input_tokens"]

    # Read everything: every document was prefilled and cached. Best first: fewer, and the river document among them.
    assert len(full_cache) == len(DOCUMENTS)
    assert 1 <= len(lazy_cache) < len(DOCUMENTS)
    base = (lazy_grounder.model_name, lazy_grounder.model_key, lazy_grounder.config.encoding_key())
    assert lazy_cache.peek(encoding_cache_key(RIVER["text"], *base))


def test_a_second_hop_request_reads_every_document_and_bad_hops_are_refused(lazy_grounder):
    body = {"query": QUERY, "documents": DOCUMENTS, "top_k": 2, "abstain": False, "hops": 2,
            "use_attention": False}
    answer, cache = ground(lazy_grounder, body)
    assert len(cache) == len(DOCUMENTS)  # a second hop may start in any document
    direct = lazy_grounder.ground(QUERY, DOCUMENTS, top_k=2, hops=2, abstain=False)
    assert evidence(answer) == [(e.document_index, e.document_id, e.start_char, e.end_char, e.text)
                                for e in direct.evidence]
    app = create_app(lazy_grounder, settings=ServiceSettings(max_documents=len(DOCUMENTS)))
    with TestClient(app) as client:
        for hops in (0, 3, "two"):
            r = client.post("/ground", json={**body, "hops": hops})
            assert r.status_code == 422 and "hops" in r.text

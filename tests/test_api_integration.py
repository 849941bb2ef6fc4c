"""The service over the real default model (integration): verbatim evidence and a cache hit on the second question."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cfic.api.app import create_app

DOCUMENT = (
    "The Norman conquest of England began in 1066 with the invasion by William, Duke of Normandy. "
    "His army defeated King Harold II at the Battle of Hastings on 14 October 1066.\n"
    "William was crowned king in Westminster Abbey on Christmas Day of the same year. "
    "Over the following years the Normans built castles across the country, among them the Tower of London.\n"
    "The Domesday Book, a survey of land and property, was completed in 1086."
)


@pytest.mark.integration
def test_real_model_grounds_verbatim_and_reuses_the_encoding(default_grounder):
    with TestClient(create_app(default_grounder)) as c:
        first = c.post("/ground", json={"query": "When was William crowned?", "documents": [{"text": DOCUMENT}]})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["model"] == default_grounder.model_name
        assert body["evidence"]
        for ev in body["evidence"]:
            assert ev["text"] == DOCUMENT[ev["start_char"]:ev["end_char"]]
        assert body["usage"]["cached_tokens"] == 0

        second = c.post("/ground", json={"query": "What was the Domesday Book?", "documents": [{"text": DOCUMENT}]})
        assert second.status_code == 200
        assert second.json()["usage"]["cached_tokens"] > 0
        assert second.json()["usage"]["stages_ms"]["encode_ms"] == 0
        for ev in second.json()["evidence"]:
            assert ev["text"] == DOCUMENT[ev["start_char"]:ev["end_char"]]

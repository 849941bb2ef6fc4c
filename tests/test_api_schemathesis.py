"""Property-based fuzzing of the REST service from its own OpenAPI schema: valid and invalid requests alike
must never produce a 5xx. Bounded (a few dozen examples per operation, derandomised) so it runs in seconds on
the tiny model and gives the same cases in CI as locally."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from cfic.api.app import create_app
from cfic.api.settings import ServiceSettings

MAX_EXAMPLES = 40
# Small limits so generated documents stay cheap for the model and the 413 paths get exercised too.
LIMITS = {"max_documents": 4, "max_document_chars": 2000, "max_query_chars": 500, "max_request_bytes": 64 * 1024,
          "timeout_s": 60.0}


def _schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")
    return schema


@pytest.fixture(scope="module")
def open_api(tiny_grounder):
    return _schema(create_app(tiny_grounder, settings=ServiceSettings(**LIMITS)))


@pytest.fixture(scope="module")
def keyed_api(tiny_grounder):
    return _schema(create_app(tiny_grounder, settings=ServiceSettings(**LIMITS, api_key="fuzz-key-123")))


# (schemathesis' own pytest integration, ``from_fixture(...).parametrize()``, breaks on pytest 9 -- it writes
# ``node._nodeid`` -- so the operations are driven through their Hypothesis strategies directly.)
OPERATIONS = [("/ground", "POST"), ("/healthz", "GET"), ("/readyz", "GET"), ("/stats", "GET")]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
_bounded = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_every_operation_is_fuzzed(open_api):
    found = {(op.ok().path, op.ok().method.upper()) for op in open_api.get_all_operations()}
    assert found == set(OPERATIONS)


# Negative cases need something to break: the GET operations take no input.
CASES = [(path, method, mode) for path, method in OPERATIONS for mode in MODES
         if mode is GenerationMode.POSITIVE or method == "POST"]


@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=lambda v: getattr(v, "value", v))
def test_no_server_errors(open_api, path, method, mode):
    statuses: list[int] = []

    @given(case=open_api[path][method].as_strategy(generation_mode=mode))
    @_bounded
    def run(case):
        statuses.append(case.call_and_validate(checks=[not_a_server_error]).status_code)

    run()
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        # Schema-valid requests must mostly reach the model: the schema states this server's real limits.
        assert statuses.count(200) > len(statuses) // 2, sorted(Counter(statuses).items())


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_no_server_errors_with_an_api_key(keyed_api, mode):
    @given(case=keyed_api["/ground"]["POST"].as_strategy(generation_mode=mode))
    @_bounded
    def run(case):
        response = case.call_and_validate(checks=[not_a_server_error])
        # Schemathesis does not know the key, so every request is refused, cleanly.
        assert response.status_code == 401

    run()

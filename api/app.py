"""The FastAPI application: ``create_app(grounder, index=..., settings=...)`` builds the service around an already
loaded ``Grounder`` (or a loader run on the worker thread, so the server answers ``/healthz`` and ``/readyz``
while the model loads).

The parts live in their own modules: ``routes`` (thin routes over one ``ModelWorker``, reached through
``app.state``), ``errors`` (every error as JSON ``{"error", "message", "request_id"}``: malformed JSON or a
malformed Content-Length 400, unauthorised 401, too large 413, not JSON 415, invalid 422, overloaded 503 with
Retry-After, timed out 504; a 500 means a bug in cfic, never bad input) and ``middleware`` (the guards that run
before the body is read). Here they are put together.

``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript and CSS from this server (``/static/docs``, the
files shipped by the ``fastapi-offline`` package), never from a CDN: they work offline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from cfic import __version__
from cfic.api.cache import EncodingCache
from cfic.api.errors import register_exception_handlers
from cfic.api.middleware import ServiceMiddleware
from cfic.api.routes import build_router
from cfic.api.schemas import MAX_SPAN_TOKENS, OFFSETS_NOTE, GroundRequest, build_request_model
from cfic.api.settings import ServiceSettings
from cfic.api.worker import ModelWorker

DOCS_ASSETS = "/static/docs"


def create_app(grounder: Any, *, index: Any = None, settings: ServiceSettings | None = None,
               config: Any = None) -> FastAPI:
    """Build the service around ``grounder`` (a ``Grounder``, or a zero-argument loader run on the worker
    thread, so the server answers ``/healthz`` and ``/readyz`` while the model loads) and an optional ``index``
    (a ``CorpusIndex`` or a loader). ``config``: the ``GroundingConfig`` a loader's grounder will have, for the
    span-token bounds the schema publishes (default: the grounder's own, or static bounds for a loader)."""
    settings = settings or ServiceSettings()
    cache = EncodingCache(settings.cache_bytes)
    worker = ModelWorker(grounder, index=index, cache=cache, max_queue=settings.max_queue,
                         max_batch=settings.max_batch)
    # FastAPIOffline: FastAPI with /docs and /redoc pages that load Swagger UI and ReDoc from files served here
    # (no CDN; validatorUrl null keeps Swagger UI from calling the public validator).
    app = FastAPIOffline(title="cfic", version=__version__, lifespan=_lifespan, static_url=DOCS_ASSETS,
                         description=_description(settings, worker.has_index),
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.worker, app.state.cache, app.state.settings = worker, cache, settings
    if config is None:  # unknown until a loader has run: the static bounds apply then
        config = getattr(worker.grounder, "config", None)
    body_model = _request_model(settings, worker, config)
    app.include_router(build_router(body_model, require_key=bool(settings.api_key)))
    register_exception_handlers(app)
    app.add_middleware(ServiceMiddleware, settings=settings)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The model worker runs while the server does; stopping it fails whatever still waits (503)."""
    worker: ModelWorker = app.state.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def _request_model(settings: ServiceSettings, worker: ModelWorker, config: Any) -> type[GroundRequest]:
    """This server's ``GroundRequest``: its limits in the schema, so the published schema tells the truth."""
    return build_request_model(
        max_documents=settings.max_documents, max_document_chars=settings.max_document_chars,
        max_query_chars=settings.max_query_chars, has_index=worker.has_index,
        max_total_chars=settings.max_total_chars,
        min_span_tokens=getattr(config, "max_sentence_tokens", 1),
        max_span_tokens=min(getattr(config, "max_span_tokens", MAX_SPAN_TOKENS), MAX_SPAN_TOKENS),
    )


def _description(settings: ServiceSettings, has_index: bool) -> str:
    return (
        "Verbatim evidence from whole documents (CFIC: constrained sentence-prefix and skip decoding).\n\n"
        f"{OFFSETS_NOTE}\n\n"
        f"Limits of this server: {settings.max_documents} documents per request, "
        f"{settings.max_document_chars} characters per document and {settings.max_total_chars} for all documents "
        f"together, {settings.max_query_chars} characters per query, {settings.max_request_bytes} bytes per "
        "request (413 beyond any of them). Request bodies are JSON (`Content-Type: application/json`, 415 "
        "otherwise) and validated strictly: numbers must be JSON numbers, strings JSON strings. "
        f"At most {settings.max_queue} requests wait for the model (503 with Retry-After beyond); a request "
        f"times out after {settings.timeout_s:g} s (504; its model work is stopped too). "
        + ("Requests may omit `documents`: the server's index supplies them." if has_index else
           "This server has no index: every request must send `documents`.")
        + (" An API key is required: `Authorization: Bearer <key>`." if settings.api_key else "")
    )

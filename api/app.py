"""The FastAPI application: thin routes over one model worker, plus the guards every public endpoint needs.

``create_app(grounder, index=..., settings=...)`` builds an app around an already loaded ``Grounder`` (or a
loader run on the worker thread). Everything a client can get wrong comes back as 4xx JSON ``{"error",
"message", "request_id"}``: malformed JSON or a malformed Content-Length 400, unauthorised 401, too large 413,
not JSON 415, invalid 422, overloaded 503 with Retry-After, timed out 504. A 500 means a bug in cfic, never bad
input.

Guards run in one ASGI middleware *before* the body is read: request id, API key (constant-time compare), the
Content-Length (digits only; several must agree), the content type of JSON endpoints (``application/json`` or
``application/*+json``, UTF-8; a missing type too is 415, as FastAPI itself never parses such a body as JSON) and
the request byte limit (Content-Length and the bytes actually streamed), so an oversized, unauthorised or
non-JSON body is never buffered whole nor parsed. (Behind uvicorn a malformed Content-Length -- negative, not a
number, conflicting values -- never reaches the app: uvicorn's HTTP parser answers its own plain-text 400 and
closes the connection, and merges identical repeated values. The middleware's JSON 400 covers ASGI servers that
pass such headers on.)

A request's model work is abandoned when it times out or its client disconnects (the route watches the ASGI
``http.disconnect`` message while it waits); the worker then stops that work between prefill passes or windows.

``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript and CSS from this server (``/static/docs``, the
files shipped by the ``fastapi-offline`` package), never from a CDN: they work offline."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cfic import __version__
from cfic.api.cache import EncodingCache
from cfic.api.schemas import (
    MAX_SPAN_TOKENS,
    OFFSETS_NOTE,
    ErrorResponse,
    EvidenceOut,
    GroundRequest,
    GroundResponse,
    HealthResponse,
    ReadyResponse,
    RetrievedDocument,
    StagesOut,
    StatsResponse,
    UsageOut,
    build_request_model,
    is_size_limit_error,
)
from cfic.api.settings import ServiceSettings
from cfic.api.worker import GroundJob, JobExpired, JobOutcome, ModelWorker, Overloaded
from cfic.errors import CficError
from cfic.types import Document

log = logging.getLogger("cfic.api")

PROTECTED_PATHS = frozenset({"/ground", "/stats"})
JSON_PATHS = frozenset({"/ground"})  # POST routes whose body is JSON (415 for another content type)
DOCS_ASSETS = "/static/docs"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LENGTH = re.compile(rb"^[0-9]{1,19}$")  # int() alone would also take "+5", " 5", "1_000"
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
                 499: "client_closed_request", 503: "overloaded", 504: "timeout"}


class ApiError(Exception):
    """An error answered as JSON with a given status, code and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_json(status: int, code: str, message: str, request_id: str, details: list | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=code, message=message, request_id=request_id, details=details)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------- middleware
def _content_type_problem(value: bytes | None) -> str | None:
    """Why a body of this Content-Type is not JSON this server reads (None: it is)."""
    if value is None:  # FastAPI (strict_content_type) would not parse the body as JSON: say why, not "invalid"
        return "the request body must be JSON: send 'Content-Type: application/json'"
    media, _, params = value.decode("latin-1").partition(";")
    kind, _, subtype = media.strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        shown = media.strip()[:100] or "an empty type"
        return f"the request body must be JSON: send 'Content-Type: application/json' (got {shown!r})"
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return f"JSON request bodies must be UTF-8 (got charset={val.strip()[:40]!r})"
    return None


class ServiceMiddleware:
    """Request id, API key, Content-Length, content type and request-size limit, before any body is read or
    parsed.

    The body is read here up to the limit and replayed to the app: FastAPI buffers JSON bodies whole anyway,
    so this costs nothing extra and makes the limit hold however the client streams (with or without
    Content-Length)."""

    def __init__(self, app: ASGIApp, *, settings: ServiceSettings,
                 protected: frozenset[str] = PROTECTED_PATHS, json_paths: frozenset[str] = JSON_PATHS):
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.protected = protected
        self.json_paths = json_paths
        # Kept as bytes only; the settings object never prints it (repr=False).
        self._key = settings.api_key.encode("utf-8") if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        supplied = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = time.monotonic()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("ascii"))]}
            await send(message)

        try:
            if self._key is not None and scope.get("path") in self.protected:
                problem = self._auth_problem(headers.get(b"authorization"))
                if problem:
                    await self._reply(scope, send_with_id, 401, "unauthorized", problem, request_id,
                                      {"WWW-Authenticate": 'Bearer realm="cfic"'})
                    return
            replay = await self._read_body(scope, receive, send_with_id, request_id)
            if replay is not None:
                await self.app(scope, replay, send_with_id)
        finally:
            # Path only: no query string, no headers (the API key must never reach a log).
            log.info("%s %s %s %d %.1fms", request_id, scope.get("method"), scope.get("path"), status[0],
                     (time.perf_counter() - started) * 1000)

    def _auth_problem(self, value: bytes | None) -> str | None:
        if not value:
            return "this server requires an API key: send 'Authorization: Bearer <key>'"
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "the Authorization header must be 'Bearer <key>'"
        assert self._key is not None
        if not hmac.compare_digest(token.strip(), self._key):
            return "the API key is not valid"
        return None

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> Receive | None:
        raw = scope.get("headers", [])
        lengths = [v.strip() for k, v in raw if k.lower() == b"content-length"]
        if lengths and (len(set(lengths)) > 1 or not all(_LENGTH.match(v) for v in lengths)):
            shown = ", ".join(v.decode("latin-1")[:40] for v in lengths[:3])
            await self._reply(scope, send, 400, "bad_request",
                              f"Content-Length must be one non-negative whole number of bytes (got {shown!r})",
                              request_id, close=True)
            return None
        if scope.get("method") == "POST" and scope.get("path") in self.json_paths:
            types = [v for k, v in raw if k.lower() == b"content-type"]
            problem = _content_type_problem(types[-1] if types else None)
            if problem is None and len(types) > 1:
                problem = "send one Content-Type header"
            if problem:
                await self._reply(scope, send, 415, "unsupported_media_type", problem, request_id, close=True)
                return None
        if lengths:
            length = int(lengths[0])
            if length > self.max_bytes:
                await self._reply(scope, send, 413, "payload_too_large", self._too_large(length), request_id)
                return None
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left; nobody to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._reply(scope, send, 413, "payload_too_large", self._too_large(None), request_id)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay

    def _too_large(self, length: int | None) -> str:
        size = f"{length} bytes" if length is not None else "the request body"
        return f"{size} exceeds this server's limit of {self.max_bytes} bytes per request"

    @staticmethod
    async def _reply(scope: Scope, send: Send, status: int, code: str, message: str, request_id: str,
                     headers: dict[str, str] | None = None, close: bool = False) -> None:
        if close or status == 413:  # the rest of the body is never read: the connection cannot be reused
            headers = {**(headers or {}), "Connection": "close"}
        response = _error_json(status, code, message, request_id, headers=headers)
        await response(scope, _never_receive, send)


async def _never_receive() -> Message:  # a response that does not read the request
    return {"type": "http.disconnect"}


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. Only awaited after the body was read: the next ASGI message of a
    request is then ``http.disconnect`` (servers send it when the client goes away, or after the response).
    Conservative: a server whose ``receive`` fails or keeps sending other messages is never read as a
    disconnect (the request then simply runs to its deadline)."""
    while True:
        try:
            message = await request.receive()
        except Exception:  # noqa: BLE001 - cannot watch this connection: never report it gone
            await asyncio.Event().wait()
        if message.get("type") == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not a compliant server: no busy loop


# ---------------------------------------------------------------------------------------------- app
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


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _STATUS_CODES.get(s, "error")} for s in statuses}


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

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    # FastAPIOffline: FastAPI with /docs and /redoc pages that load Swagger UI and ReDoc from files served here
    # (no CDN; validatorUrl null keeps Swagger UI from calling the public validator).
    app = FastAPIOffline(title="cfic", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         description=_description(settings, worker.has_index),
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.worker = worker
    app.state.cache = cache
    app.state.settings = settings
    app.add_middleware(ServiceMiddleware, settings=settings)
    # Declares the bearer scheme in OpenAPI (and /docs); the check itself is in the middleware, before the
    # body is read.
    bearer = HTTPBearer(auto_error=False, description="The server's API key.")
    auth = [Depends(bearer)] if settings.api_key else []

    # ------------------------------------------------------------------------------------ error handlers
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_json(exc.status, exc.code, exc.message, _request_id(request), headers=exc.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error_json(503, "overloaded", str(exc), _request_id(request),
                           headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(JobExpired)
    async def _expired(request: Request, exc: JobExpired) -> JSONResponse:
        return _error_json(504, "timeout", str(exc), _request_id(request))

    @app.exception_handler(CficError)
    async def _cfic_error(request: Request, exc: CficError) -> JSONResponse:
        return _error_json(422, "invalid_request", str(exc) or type(exc).__name__, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                    "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]
        if any(e["type"] == "json_invalid" for e in details):
            return _error_json(400, "bad_request", "the request body is not valid JSON", _request_id(request),
                               details)
        too_large = [e for e in details if is_size_limit_error(e["type"], e["loc"])]
        if too_large:
            where = ".".join(str(p) for p in too_large[0]["loc"][1:])
            message = f"{where}: {too_large[0]['msg']} (this server's limit)"
            return _error_json(413, "payload_too_large", message, _request_id(request), too_large)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "body"
        more = f" (and {len(details) - 1} more problem(s))" if len(details) > 1 else ""
        message = f"{where}: {first['msg']}{more}"
        return _error_json(422, "invalid_request", message, _request_id(request), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return _error_json(exc.status_code, code, str(exc.detail), _request_id(request),
                           headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error in request %s: %s: %s", _request_id(request), type(exc).__name__, exc)
        message = "internal server error (a bug in cfic; the request id finds it in the server log)"
        return _error_json(500, "internal_error", message, _request_id(request))

    # ------------------------------------------------------------------------------------ routes
    @app.get("/healthz", response_model=HealthResponse, tags=["probes"], summary="The process is up")
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, tags=["probes"], summary="The model is loaded",
             responses={503: {"model": ReadyResponse, "description": "loading or failed"}})
    async def readyz() -> JSONResponse:
        worker.start()  # no-op when running; starts it for ASGI clients that skip the lifespan
        ready = worker.state == "ready" and worker.alive
        g = worker.grounder
        body = ReadyResponse(
            status="ready" if ready else ("loading" if worker.state in ("loading", "ready")
                                          else worker.state),
            model=getattr(g, "model_name", None),
            index_documents=_index_size(worker.index),
            detail=worker.error,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/stats", response_model=StatsResponse, tags=["operations"], dependencies=auth,
             responses=_error_responses(401), summary="Queue, batching and cache counters")
    async def stats() -> StatsResponse:
        s = worker.stats
        return StatsResponse(queue_depth=worker.queue_depth, max_queue=settings.max_queue,
                             processed=s.processed, rejected=s.rejected, timed_out=s.timed_out,
                             skipped=s.skipped, cancelled=s.cancelled, batches=s.batches,
                             max_batch_seen=s.max_batch_seen,
                             cache=cache.stats().to_dict())

    async def ground(body: GroundRequest, request: Request) -> GroundResponse:
        state = request.scope.get("state", {})
        request_id = _request_id(request)
        arrived = state.get("arrived", time.monotonic())
        documents = None
        if body.documents is not None:
            total = sum(len(d.text) for d in body.documents)
            if total > settings.max_total_chars:
                raise ApiError(413, "payload_too_large",
                               f"documents: {total} characters in all exceed this server's limit of "
                               f"{settings.max_total_chars} characters of documents per request")
            documents = [Document(d.text, d.id if d.id is not None else str(i), d.metadata)
                         for i, d in enumerate(body.documents)]
        loop = asyncio.get_running_loop()
        job = GroundJob(
            query=body.query, documents=documents, top_k=body.top_k, max_span_tokens=body.max_span_tokens,
            threshold=body.threshold, abstain=body.abstain,
            top_documents=getattr(body, "top_documents", None) or settings.index_top_documents,
            deadline=arrived + settings.timeout_s, future=loop.create_future(), loop=loop,
            request_id=request_id,
        )
        worker.start()  # no-op when the lifespan already started it (some ASGI clients skip the lifespan)
        worker.submit(job)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({job.future, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            worker.abandon(job)  # the request task was cancelled: the worker drops or stops its work
            raise
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone
        if not job.future.done():
            # Abandoned: a job still waiting leaves the queue now, a running one is stopped by the worker at its
            # next cancellation point (between prefill passes or windows), so the model moves on.
            worker.abandon(job)
            if gone.done() and not gone.cancelled():
                # Nobody reads this answer; the status (nginx's 499) is for the log line.
                raise ApiError(499, "client_closed_request", "the client closed the connection")
            worker.stats.timed_out += 1
            message = f"the request did not finish within {settings.timeout_s:g} s"
            raise ApiError(504, "timeout", message)
        outcome: JobOutcome = job.future.result()  # or the job's own error (422, 503, 504)
        return _response(request_id, outcome, arrived)

    # The body model is this server's own (its limits in the schema); FastAPI reads it from the annotation.
    if config is None:  # unknown until a loader has run: the static bounds apply
        config = getattr(worker.grounder, "config", None)
    ground.__annotations__["body"] = build_request_model(
        max_documents=settings.max_documents, max_document_chars=settings.max_document_chars,
        max_query_chars=settings.max_query_chars, has_index=worker.has_index,
        max_total_chars=settings.max_total_chars,
        min_span_tokens=getattr(config, "max_sentence_tokens", 1),
        max_span_tokens=min(getattr(config, "max_span_tokens", MAX_SPAN_TOKENS), MAX_SPAN_TOKENS),
    )
    app.post(
        "/ground", response_model=GroundResponse, tags=["grounding"], dependencies=auth,
        summary="Verbatim evidence for a question",
        description="Find the sentences of the documents that answer the query, copied verbatim with their "
                    f"character offsets. {OFFSETS_NOTE}",
        responses=_error_responses(400, 401, 413, 415, 422, 503, 504),
    )(ground)
    return app


def _response(request_id: str, outcome: JobOutcome, arrived: float) -> GroundResponse:
    r = outcome.result
    usage = UsageOut(
        input_tokens=r.usage.input_tokens, cached_tokens=outcome.cached_tokens,
        latency_ms=round((time.monotonic() - arrived) * 1000, 3),
        stages_ms=StagesOut(queue_ms=round(outcome.queue_ms, 3), encode_ms=round(outcome.encode_ms, 3),
                            prefix_ms=round(r.usage.prefix_ms, 3), skip_ms=round(r.usage.skip_ms, 3)),
    )
    documents = None
    if outcome.retrieved is not None:
        documents = [RetrievedDocument(id=d.id, text=d.text, metadata=d.metadata, score=d.score)
                     for d in outcome.retrieved]
    return GroundResponse(
        request_id=request_id, query=r.query, model=r.model,
        evidence=[EvidenceOut(**e.to_dict()) for e in r.evidence], no_evidence=r.no_evidence,
        no_evidence_probability=r.no_evidence_probability, usage=usage,
        documents=documents,
    )


def _index_size(index: Any) -> int | None:
    if index is None:
        return None
    for name in ("__len__", "size", "n_documents", "num_documents"):
        attr = getattr(index, name, None)
        if attr is None:
            continue
        try:
            value = attr() if callable(attr) else attr
        except Exception:  # noqa: BLE001 - a count is informative only
            return None
        if isinstance(value, int):
            return value
    return None

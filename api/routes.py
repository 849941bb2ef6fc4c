"""The HTTP routes: thin functions over the model worker, which they get (with the settings and the cache) from
``app.state`` through small ``Depends`` functions, so a route names what it needs and tests can build an app
around any worker.

``POST /ground`` validates its body with a request model built per server (``schemas.build_request_model``: its
limits are in the published schema). ``build_router`` receives that model and declares it as the body type of
the route it creates, so FastAPI validates with it and documents it like any other annotated body.

A request's model work is abandoned when it times out or its client disconnects (``ground`` watches the ASGI
``http.disconnect`` message while it waits); the worker then stops that work between prefill passes, readings or
windows."""

# No ``from __future__ import annotations`` here: ``build_router`` annotates the body with a model held in a local
# variable, which FastAPI can only resolve when the annotation is evaluated where the route is defined.
import asyncio
import contextlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from cfic.api.cache import EncodingCache
from cfic.api.errors import ApiError, error_responses, request_id
from cfic.api.schemas import (
    OFFSETS_NOTE,
    EvidenceOut,
    GroundRequest,
    GroundResponse,
    HealthResponse,
    ReadyResponse,
    RetrievedDocument,
    StagesOut,
    StatsResponse,
    UsageOut,
)
from cfic.api.settings import ServiceSettings
from cfic.api.worker import GroundJob, JobOutcome, ModelWorker
from cfic.documents import as_document


# ---------------------------------------------------------------------------------------------- dependencies
def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_cache(request: Request) -> EncodingCache:
    return request.app.state.cache


Worker = Annotated[ModelWorker, Depends(get_worker)]
Settings = Annotated[ServiceSettings, Depends(get_settings)]
Cache = Annotated[EncodingCache, Depends(get_cache)]

# Declares the bearer scheme in OpenAPI (and /docs); the check itself is in the middleware, before the body is read.
BEARER = HTTPBearer(auto_error=False, description="The server's API key.")


# ---------------------------------------------------------------------------------------------- routes
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


async def readyz(worker: Worker) -> JSONResponse:
    worker.start()  # no-op when running; starts it for ASGI clients that skip the lifespan
    ready = worker.state == "ready" and worker.alive
    body = ReadyResponse(
        status="ready" if ready else ("loading" if worker.state in ("loading", "ready") else worker.state),
        model=getattr(worker.grounder, "model_name", None),
        index_documents=_index_size(worker.index),
        detail=worker.error,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def stats(worker: Worker, settings: Settings, cache: Cache) -> StatsResponse:
    s = worker.stats
    return StatsResponse(queue_depth=worker.queue_depth, max_queue=settings.max_queue,
                         processed=s.processed, rejected=s.rejected, timed_out=s.timed_out,
                         skipped=s.skipped, cancelled=s.cancelled, batches=s.batches,
                         max_batch_seen=s.max_batch_seen, cache=cache.stats().to_dict())


async def ground(body: GroundRequest, request: Request, worker: ModelWorker,
                 settings: ServiceSettings) -> GroundResponse:
    """Queue the request's model work and wait for it, its deadline or its client's departure, whichever comes
    first; abandoned work is dropped from the queue or stopped by the worker, so the model moves on."""
    rid = request_id(request)
    arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
    documents = None
    if body.documents is not None:
        total = sum(len(d.text) for d in body.documents)
        if total > settings.max_total_chars:
            raise ApiError(413, "payload_too_large",
                           f"documents: {total} characters in all exceed this server's limit of "
                           f"{settings.max_total_chars} characters of documents per request")
        documents = [as_document(d.model_dump(), i) for i, d in enumerate(body.documents)]
    loop = asyncio.get_running_loop()
    job = GroundJob(
        query=body.query, documents=documents, top_k=body.top_k, max_span_tokens=body.max_span_tokens,
        threshold=body.threshold, abstain=body.abstain, use_attention=body.use_attention, hops=body.hops,
        top_documents=getattr(body, "top_documents", None) or settings.index_top_documents,
        deadline=arrived + settings.timeout_s, future=loop.create_future(), loop=loop, request_id=rid,
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
        # next cancellation point (between prefill passes, readings or windows), so the model moves on.
        worker.abandon(job)
        if gone.done() and not gone.cancelled():
            # Nobody reads this answer; the status (nginx's 499) is for the log line.
            raise ApiError(499, "client_closed_request", "the client closed the connection")
        worker.stats.timed_out += 1
        raise ApiError(504, "timeout", f"the request did not finish within {settings.timeout_s:g} s")
    outcome: JobOutcome = job.future.result()  # or the job's own error (422, 503, 504)
    return _response(rid, outcome, arrived)


def build_router(body_model: type[GroundRequest], *, require_key: bool) -> APIRouter:
    """The service's routes, with ``body_model`` (this server's ``GroundRequest``) as the body of /ground and
    the bearer scheme on the data endpoints when the server has an API key."""
    auth = [Depends(BEARER)] if require_key else []
    router = APIRouter()
    router.add_api_route("/healthz", healthz, response_model=HealthResponse, tags=["probes"],
                         summary="The process is up")
    router.add_api_route("/readyz", readyz, response_model=ReadyResponse, tags=["probes"],
                         summary="The model is loaded",
                         responses={503: {"model": ReadyResponse, "description": "loading or failed"}})
    router.add_api_route("/stats", stats, response_model=StatsResponse, tags=["operations"], dependencies=auth,
                         responses=error_responses(401), summary="Queue, batching and cache counters")

    async def ground_route(body: body_model, request: Request, worker: Worker,  # type: ignore[valid-type]
                           settings: Settings) -> GroundResponse:
        return await ground(body, request, worker, settings)

    router.add_api_route(
        "/ground", ground_route, methods=["POST"], name="ground", response_model=GroundResponse,
        tags=["grounding"], dependencies=auth, summary="Verbatim evidence for a question",
        description="Find the sentences of the documents that answer the query, copied verbatim with their "
                    f"character offsets. {OFFSETS_NOTE}",
        responses=error_responses(400, 401, 413, 415, 422, 503, 504),
    )
    return router


# ---------------------------------------------------------------------------------------------- helpers
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


def _response(rid: str, outcome: JobOutcome, arrived: float) -> GroundResponse:
    r = outcome.result
    usage = UsageOut(
        input_tokens=r.usage.input_tokens, cached_tokens=outcome.cached_tokens,
        latency_ms=round((time.monotonic() - arrived) * 1000, 3),
        stages_ms=StagesOut(queue_ms=round(outcome.queue_ms, 3), encode_ms=round(outcome.encode_ms, 3),
                            reading_ms=round(r.usage.reading_ms, 3), prefix_ms=round(r.usage.prefix_ms, 3),
                            skip_ms=round(r.usage.skip_ms, 3)),
    )
    documents = None
    if outcome.retrieved is not None:
        documents = [RetrievedDocument(id=d.id, text=d.text, metadata=d.metadata, score=d.score)
                     for d in outcome.retrieved]
    return GroundResponse(
        request_id=rid, query=r.query, model=r.model,
        evidence=[EvidenceOut(**e.to_dict()) for e in r.evidence], no_evidence=r.no_evidence,
        no_evidence_probability=r.no_evidence_probability, usage=usage, documents=documents,
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

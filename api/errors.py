"""Every error the service answers, as JSON ``{"error", "message", "request_id"}``: one handler per exception type,
registered from ``EXCEPTION_HANDLERS`` so the mapping from failure to status code reads as one table.

A client's mistake is a 4xx with a stable ``error`` code; a 500 means a bug in cfic, never bad input (its message
says so, and the request id finds it in the server log)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cfic.api.schemas import ErrorResponse, is_size_limit_error
from cfic.api.worker import JobExpired, Overloaded
from cfic.errors import CficError

log = logging.getLogger("cfic.api")

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
                499: "client_closed_request", 503: "overloaded", 504: "timeout"}


class ApiError(Exception):
    """An error answered as JSON with a given status, code and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_json(status: int, code: str, message: str, request_id: str, details: list | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body of the service (``ErrorResponse``)."""
    body = ErrorResponse(error=code, message=message, request_id=request_id, details=details)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    """The id ``ServiceMiddleware`` gave the request (a fresh one if it never ran, e.g. in a bare ASGI test)."""
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses: all share ``ErrorResponse``."""
    return {s: {"model": ErrorResponse, "description": STATUS_CODES.get(s, "error")} for s in statuses}


# ---------------------------------------------------------------------------------------------- handlers
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message, request_id(request), headers=exc.headers)


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return error_json(503, "overloaded", str(exc), request_id(request), headers={"Retry-After": str(exc.retry_after)})


async def expired(request: Request, exc: JobExpired) -> JSONResponse:
    return error_json(504, "timeout", str(exc), request_id(request))


async def cfic_error(request: Request, exc: CficError) -> JSONResponse:
    """Input the core refused (an empty document, a query too long for the model): the client's to fix."""
    return error_json(422, "invalid_request", str(exc) or type(exc).__name__, request_id(request))


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Schema violations: 400 for JSON that does not parse, 413 for a broken size limit (a different remedy than
    a malformed field), 422 otherwise; the first problem in the message, all of them in ``details``."""
    details = [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
    rid = request_id(request)
    if any(e["type"] == "json_invalid" for e in details):
        return error_json(400, "bad_request", "the request body is not valid JSON", rid, details)
    too_large = [e for e in details if is_size_limit_error(e["type"], e["loc"])]
    if too_large:
        where = ".".join(str(p) for p in too_large[0]["loc"][1:])
        return error_json(413, "payload_too_large", f"{where}: {too_large[0]['msg']} (this server's limit)", rid,
                          too_large)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"][1:]) or "body"
    more = f" (and {len(details) - 1} more problem(s))" if len(details) > 1 else ""
    return error_json(422, "invalid_request", f"{where}: {first['msg']}{more}", rid, details)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404, 405, ...) in the same JSON shape as the service's own."""
    code = STATUS_CODES.get(exc.status_code, "error")
    return error_json(exc.status_code, code, str(exc.detail), request_id(request),
                      headers=getattr(exc, "headers", None))


async def bug(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is cfic's fault: log it (by request id, without the request) and say so."""
    log.error("internal error in request %s: %s: %s", request_id(request), type(exc).__name__, exc)
    message = "internal server error (a bug in cfic; the request id finds it in the server log)"
    return error_json(500, "internal_error", message, request_id(request))


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    ApiError: api_error,
    Overloaded: overloaded,
    JobExpired: expired,
    CficError: cfic_error,
    RequestValidationError: invalid,
    StarletteHTTPException: http_error,
    Exception: bug,
}


def register_exception_handlers(app: FastAPI) -> None:
    for exc_type, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)

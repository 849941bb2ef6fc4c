"""The guards every public endpoint needs, in one ASGI middleware that runs *before* the body is read: request
id, API key (constant-time compare), the Content-Length (digits only; several must agree), the content type of
JSON endpoints (``application/json`` or ``application/*+json``, UTF-8; a missing type too is 415, as FastAPI
itself never parses such a body as JSON) and the request byte limit (Content-Length and the bytes actually
streamed), so an oversized, unauthorised or non-JSON body is never buffered whole nor parsed. (Behind uvicorn a
malformed Content-Length -- negative, not a number, conflicting values -- never reaches the app: uvicorn's HTTP
parser answers its own plain-text 400 and closes the connection, and merges identical repeated values. The
middleware's JSON 400 covers ASGI servers that pass such headers on.)"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cfic.api.errors import error_json
from cfic.api.settings import ServiceSettings

log = logging.getLogger("cfic.api")

PROTECTED_PATHS = frozenset({"/ground", "/stats"})
JSON_PATHS = frozenset({"/ground"})  # POST routes whose body is JSON (415 for another content type)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LENGTH = re.compile(rb"^[0-9]{1,19}$")  # int() alone would also take "+5", " 5", "1_000"


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
        response = error_json(status, code, message, request_id, headers=headers)
        await response(scope, _never_receive, send)


async def _never_receive() -> Message:  # a response that does not read the request
    return {"type": "http.disconnect"}

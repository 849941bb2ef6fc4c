"""The service behind a real uvicorn server on the loopback interface, and the `serve` command's own behaviour."""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cfic.api.app import create_app
from cfic.api.loadtest import _stop_server
from cfic.api.settings import ServiceSettings, parse_size

KEY = "live-Server-key-987"
DOC = {"id": "d", "text": "The Normans conquered England in 1066. They built many castles. The end."}


@pytest.fixture
def live_server(tiny_grounder, caplog):
    import uvicorn

    caplog.set_level(logging.DEBUG)
    app = create_app(tiny_grounder, settings=ServiceSettings(api_key=KEY, max_request_bytes=20_000))
    # log_config=None: uvicorn's loggers propagate to the root logger, so caplog sees its access log too.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="debug", access_log=True,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


def test_real_http_round_trip_limits_and_no_key_in_logs(live_server, caplog):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live_server, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/ground", json={"query": "q", "documents": [DOC]}).status_code == 401
        assert c.post("/ground", json={"query": "q", "documents": [DOC]},
                      headers={"Authorization": f"Bearer {KEY[:-1]}"}).status_code == 401
        r = c.post("/ground", json={"query": "When did the Normans conquer England?", "documents": [DOC]},
                   headers=auth)
        assert r.status_code == 200, r.text
        for ev in r.json()["evidence"]:
            assert ev["text"] == DOC["text"][ev["start_char"]:ev["end_char"]]

        # Declared too large: refused from the Content-Length alone.
        big = b'{"query": "q", "documents": [{"text": "' + b"z" * 30_000 + b'"}]}'
        r = c.post("/ground", content=big, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

        # Streamed without a length (chunked transfer encoding): counted as it arrives.
        def chunks():
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]

        try:
            r = c.post("/ground", content=chunks(), headers={**auth, "content-type": "application/json"})
            assert r.status_code == 413
        except httpx.TransportError:
            pass  # the server may close the connection while the client is still sending: also a refusal
    with httpx.Client(base_url=live_server, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/ground", json={"query": "q", "documents": [DOC]}, headers=auth).status_code == 200

    messages = [rec.getMessage() for rec in caplog.records]
    assert any("/ground" in m for m in messages), "no request was logged"
    assert KEY not in caplog.text
    assert not any(KEY in m for m in messages)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfic.api.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_serve_help_is_light_and_never_shows_the_key():
    out = _cli("--help", env={"CFIC_API_KEY": "env-secret-KEY-42"})
    assert out.returncode == 0, out.stderr
    assert "--api-key" in out.stdout and "--max-queue" in out.stdout and "--cache-bytes" in out.stdout
    assert "env-secret-KEY-42" not in out.stdout + out.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, cfic.api.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False"


def test_serve_reports_a_bad_model_as_an_error_without_starting(tmp_path):
    out = _cli("--model", str(tmp_path / "missing-model"), "--port", "0", env={"CFIC_API_KEY": "another-Key-77"})
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "missing-model" in out.stderr
    assert "another-Key-77" not in out.stdout + out.stderr
    bad_size = _cli("--cache-bytes", "lots", "--port", "0")
    assert bad_size.returncode == 2 and "not a size" in bad_size.stderr


def test_serve_limits_come_from_the_environment_unless_given(tmp_path):
    """CFIC_SERVE_* fills the limits left at their defaults; an option given on the command line wins."""
    missing = str(tmp_path / "missing-model")
    from_env = _cli("--model", missing, "--port", "0", env={"CFIC_SERVE_MAX_QUEUE": "0"})
    assert from_env.returncode == 2 and "max_queue" in from_env.stderr
    given = _cli("--model", missing, "--port", "0", "--max-queue", "5", env={"CFIC_SERVE_MAX_QUEUE": "0"})
    assert given.returncode == 2 and "max_queue" not in given.stderr and "missing-model" in given.stderr


def _raw_post(base_url: str, headers: bytes, body: bytes = b"{}") -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 request written byte for byte (clients normalise headers; a server must cope with any)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /ground HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, payload


def test_malformed_content_length_behind_uvicorn(live_server):
    """uvicorn's HTTP parser (h11) answers a malformed Content-Length itself -- negative, not a number, conflicting
    values -- with a plain-text 400 and closes the connection: the app never sees the request, so cfic cannot make
    that answer JSON (test_api_service checks the middleware's JSON 400 through the ASGI app). Identical repeated
    values are merged by the parser and served normally. Either way the server goes on serving."""
    auth = f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
    for bad in (b"-1", b"abc", b"+2", b"2, 3"):
        status, head, _ = _raw_post(live_server, auth + b"Content-Length: " + bad + b"\r\n")
        assert status == 400, bad
        assert b"x-request-id" not in head.lower(), "the app answered: this test's premise changed"
    status, head, payload = _raw_post(live_server, auth + b"Content-Length: 2\r\nContent-Length: 2\r\n")
    assert status == 422 and json.loads(payload)["error"] == "invalid_request"  # "{}" reached the app, as JSON
    with httpx.Client(base_url=live_server, timeout=30) as c:
        assert c.get("/healthz").status_code == 200


def test_cli_defaults_are_the_service_defaults():
    """The CLI repeats the defaults (importing the settings would slow `cfic --help`): they must not drift."""
    from cfic.api.cli import DEFAULT_MODEL, serve_command
    from cfic.models import DEFAULT_MODEL as MODELS_DEFAULT

    assert DEFAULT_MODEL == MODELS_DEFAULT
    opts = {name: p.default for name, p in inspect.signature(serve_command).parameters.items()}
    d = ServiceSettings()
    assert (opts["max_documents"], opts["max_document_chars"], opts["max_total_chars"], opts["max_queue"],
            opts["max_batch"], opts["timeout"]) == (d.max_documents, d.max_document_chars, d.max_total_chars,
                                                   d.max_queue, d.max_batch, d.timeout_s)
    assert parse_size(opts["max_request_bytes"]) == d.max_request_bytes
    assert parse_size(opts["cache_bytes"]) == d.cache_bytes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_liveness_at_once_and_loads_the_model_in_the_background(tiny_loaded, tmp_path):
    """`cfic serve` used to load the model before it listened: /healthz was unreachable during the load. Now the
    server listens first; /healthz answers while /readyz says "loading" (503, JSON), then "ready"."""
    folder = tmp_path / "tiny-model"
    tiny_loaded.model.save_pretrained(folder)
    tiny_loaded.tokenizer.save_pretrained(folder)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cfic.api.cli", "--model", str(folder), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen: list[tuple[int, int, dict]] = []  # (healthz, readyz, readyz body) as observed over time
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=base, timeout=10) as c:
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                try:
                    health = c.get("/healthz").status_code
                    ready = c.get("/readyz")
                except httpx.TransportError:
                    time.sleep(0.02)  # not listening yet
                    continue
                seen.append((health, ready.status_code, ready.json()))
                if ready.status_code == 200:
                    break
                time.sleep(0.02)
            assert seen and seen[-1][1] == 200, seen[-3:]
            loading = [s for s in seen if s[1] == 503]
            assert loading, "the server only answered once the model was loaded"
            assert all(h == 200 and body["status"] == "loading" for h, _, body in loading), loading[:3]
            assert seen[-1][2]["status"] == "ready" and seen[-1][2]["model"] == "tiny-model"
            r = c.post("/ground", json={"query": "When did the Normans conquer England?", "documents": [DOC]})
            assert r.status_code == 200, r.text
            for ev in r.json()["evidence"]:
                assert ev["text"] == DOC["text"][ev["start_char"]:ev["end_char"]]
    finally:
        _stop_server(proc)
    assert proc.returncode == 0


def test_serve_stops_with_an_error_when_the_background_load_fails(tmp_path):
    """A model folder that passes the quick checks but cannot be loaded: the server started (and answered
    /readyz "failed" meanwhile), then stops with the CLI's error convention instead of never becoming ready."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out = _cli("--model", str(folder), "--port", str(_free_port()))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Uvicorn running on" in out.stderr  # it listened before the model was loaded
    assert "error: the server stopped: loading failed" in out.stderr and "broken-model" in out.stderr

"""The service behind a real uvicorn server on the loopback interface, and the `serve` command's own behaviour."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cfic.api.app import create_app
from cfic.api.settings import ServiceSettings

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

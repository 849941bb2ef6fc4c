"""``/docs`` (Swagger UI) and ``/redoc`` work with no network: their pages name no other host, and every script,
stylesheet and icon they load is served by the app itself from files on disk (``cfic.api.app.DOCS_ASSETS``), so
the interactive docs work on a machine without internet access. The app is built around the tiny random model
(as in test_api_service); no socket may be opened while it starts and serves the docs."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from cfic.api.app import DOCS_ASSETS, create_app

PAGES = ["/docs", "/redoc"]
# What a page loads: <script src>, <link href>, ReDoc's spec-url and Swagger UI's ``url: '...'`` (the schema).
REFERENCE = re.compile(r"""(?:\bsrc=|\bhref=|\bspec-url=|\burl:\s*)["']([^"']+)["']""")
# A URL on another host: http://, https:// or protocol-relative //host.
EXTERNAL = re.compile(r"""(?i)(?:\bhttps?:)?//[a-z0-9][a-z0-9.-]*\.[a-z]{2,}""")


def external_urls(html: str) -> list[str]:
    return EXTERNAL.findall(html)


def references(html: str) -> list[str]:
    return REFERENCE.findall(html)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach a host fails (and is recorded): name resolution, connect, create_connection.
    (socketpair, which asyncio uses for its own wake-ups, is local and left alone.)"""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network disabled by test_api_docs")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(params=["", "/cfic"], ids=["root", "behind-a-proxy-prefix"])
def client(request, tiny_grounder, no_network):
    """The service with no network, served at the root or under a reverse proxy's prefix (``root_path``)."""
    with TestClient(create_app(tiny_grounder), root_path=request.param) as c:
        c.prefix = request.param
        yield c
    assert no_network == [], f"the app tried to reach the network: {no_network}"


@pytest.mark.parametrize("page", PAGES)
def test_docs_pages_and_everything_they_load_come_from_this_server(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert external_urls(html) == [], html
    refs = references(html)
    assert any(u.endswith(".js") for u in refs), refs
    if page == "/docs":
        assert any(u.endswith(".css") for u in refs), refs
        assert '"validatorUrl": null' in html  # else Swagger UI sends the schema to validator.swagger.io
    assert f"{client.prefix}/openapi.json" in refs, refs
    for url in refs:
        assert url.startswith(f"{client.prefix}/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        kind = asset.headers["content-type"]
        if url.endswith(".js"):
            assert "javascript" in kind and len(asset.content) > 100_000, url  # the real bundle, not a stub
        elif url.endswith(".css"):
            assert kind.startswith("text/css") and len(asset.content) > 10_000, url
        elif url.endswith(".json"):
            assert set(asset.json()["paths"]) >= {"/ground", "/healthz", "/readyz"}


def test_the_docs_assets_are_files_on_disk_not_downloads(client):
    """The assets mount serves a folder that exists before the app starts (installed with the package), and what
    it serves is exactly those files."""
    mount = next(r for r in client.app.routes if isinstance(r, Mount) and r.path == DOCS_ASSETS)
    folder = Path(mount.app.directory)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert {p.suffix for p in files} >= {".js", ".css"}, files
    for path in files:
        served = client.get(f"{client.prefix}{DOCS_ASSETS}/{path.name}")
        assert served.status_code == 200 and served.content == path.read_bytes(), path.name


def test_the_openapi_schema_is_still_published(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["info"]["title"] == "cfic" and "/ground" in schema["paths"]
    # The docs pages and their assets are not API endpoints.
    assert not any(p.startswith(("/docs", "/redoc", DOCS_ASSETS)) for p in schema["paths"])


@pytest.mark.parametrize("page", PAGES)
def test_the_check_catches_a_page_that_loads_from_a_cdn(page):
    """Control: a stock FastAPI app's pages load Swagger UI and ReDoc from cdn.jsdelivr.net, and the check above
    sees it -- so it would fail if cfic's pages fell back to them."""
    with TestClient(FastAPI()) as c:
        html = c.get(page).text
    found = external_urls(html)
    assert any("cdn.jsdelivr.net" in u for u in found), html
    assert any(u.startswith("https://cdn.jsdelivr.net/") for u in references(html)), references(html)

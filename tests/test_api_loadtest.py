"""End to end through a real process: the load-test script starts `python -m cfic.api.cli` on a saved tiny model
folder (loopback only), drives it briefly, and checks the server still answers afterwards. The soak's verdict
(``soak_failures``), status classification, raw-socket client and memory figures are also tested on their own, on
doctored inputs, so that each invariant is known to fail when it should."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest


def test_loadtest_drives_a_served_model_folder_and_the_server_survives(tiny_model_folder, tmp_path):
    folder = tiny_model_folder
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "cfic.api.loadtest", "--model", str(folder), "--clients", "2", "--seconds", "2",
           "--phases", "unique,repeated,overload", "--overload-clients", "12", "--overload-seconds", "2",
           "--max-queue", "2", "--max-batch", "1", "--doc-words", "60", "--pool", "2", "--startup-timeout", "180",
           "--json", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        pytest.fail(f"load test failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(report.read_text())
    unique, repeated, overload = result["phases"]
    assert unique["ok"] > 0 and unique["cached_token_share"] == 0.0
    assert repeated["ok"] > 0 and repeated["cached_token_share"] > 0.5
    for phase in (unique, repeated, overload):
        assert phase["other_errors"] == {}, phase  # only 200s and 503s, never a 5xx or a dropped connection
        assert phase["p50_ms"] is not None and phase["p95_ms"] >= phase["p50_ms"]
    assert result["after"] == {"healthz": 200, "ground": 200, "verbatim": True}
    assert result["server_exit_code"] is not None  # the server was stopped
    assert "| phase |" in out.stdout


# ---------------------------------------------------------------------------------------------------- soak mode
def clean_soak_result() -> dict:
    """A soak result that passes every invariant (the shape run_soak writes)."""
    return {
        "kinds": {
            "hit": {"group": "hit", "requests": 10, "statuses": {"200": 9, "503": 1}},
            "miss": {"group": "miss", "requests": 4, "statuses": {"200": 3, "504": 1}},
            "invalid_json": {"group": "malformed", "requests": 2, "statuses": {"400": 2}},
            "too_many_documents": {"group": "oversize", "requests": 1, "statuses": {"413": 1}},
            "disconnect_reset": {"group": "disconnect", "requests": 3, "statuses": {"closed": 2, "200": 1}},
        },
        "server_exited_at_s": None,
        "after": {"healthz": 200, "ground": 200, "verbatim": True},
        "rss_mib": {"peak": 900.0, "bound": 1000.0},
        "server_log_errors": [],
    }


def test_soak_invariants_accept_a_clean_run_and_name_each_failure():
    from cfic.api.loadtest import soak_failures

    assert soak_failures(clean_soak_result()) == []
    doctored = [
        (lambda r: r["kinds"]["hit"]["statuses"].update({"500": 1}), "statuses outside"),
        (lambda r: r["kinds"]["miss"]["statuses"].update({"502": 1}), "statuses outside"),
        (lambda r: r["kinds"]["miss"]["statuses"].update({"transport:ReadError": 1}), "statuses outside"),
        (lambda r: r["kinds"]["miss"]["statuses"].update({"client_timeout": 1}), "statuses outside"),
        (lambda r: r["kinds"]["hit"]["statuses"].update({"closed": 1}), "statuses outside"),  # only disconnects hang up
        (lambda r: r["kinds"]["disconnect_reset"]["statuses"].update({"dropped": 1}), "statuses outside"),
        (lambda r: r["kinds"]["invalid_json"]["statuses"].update({"malformed_answer": 1}), "statuses outside"),
        (lambda r: r["kinds"]["invalid_json"]["statuses"].update({"200": 1}), "bad input was accepted"),
        (lambda r: r["kinds"]["too_many_documents"]["statuses"].update({"200": 1}), "bad input was accepted"),
        (lambda r: r["kinds"]["too_many_documents"].update(requests=0, statuses={}), "never tried"),
        (lambda r: [r["kinds"][k]["statuses"].pop("200") for k in ("hit", "miss")], "no hit or miss"),
        (lambda r: r.update(server_exited_at_s=12.0), "exited during the soak"),
        (lambda r: r["after"].update(ground=503), "not alive"),
        (lambda r: r["after"].update(verbatim=False), "not alive"),
        (lambda r: r.update(after={"healthz": None, "ground": None, "verbatim": None, "error": "ConnectError"}),
         "not alive"),
        (lambda r: r["rss_mib"].update(peak=1200.0), "exceeds the bound"),
        (lambda r: r.update(server_log_errors=["Traceback (most recent call last):"]), "error line"),
    ]
    for change, message in doctored:
        result = clean_soak_result()
        change(result)
        failures = soak_failures(result)
        assert len(failures) == 1 and message in failures[0], (message, failures)


def test_allowed_statuses_are_200_4xx_503_504_and_hang_ups_only_for_disconnecting_clients():
    from cfic.api.loadtest import _allowed_status

    for status in ("200", "400", "404", "413", "415", "422", "429", "499", "503", "504"):
        assert _allowed_status(status, "hit") and _allowed_status(status, "malformed"), status
    for status in ("500", "501", "502", "505", "201", "204", "301", "399", "dropped", "malformed_answer",
                   "client_timeout", "transport:RemoteProtocolError", ""):
        assert not _allowed_status(status, "hit") and not _allowed_status(status, "disconnect"), status
    assert _allowed_status("closed", "disconnect")
    assert not any(_allowed_status("closed", g) for g in ("hit", "miss", "oversize", "malformed"))


def test_soak_mix_and_server_env_are_parsed_strictly():
    from cfic.api.loadtest import DEFAULT_MIX, SOAK_GROUPS, _parse_env, _parse_mix

    mix = _parse_mix(DEFAULT_MIX)
    assert set(mix) == set(SOAK_GROUPS) and all(w > 0 for w in mix.values())
    assert _parse_mix(" hit = 1 , miss=0") == {"hit": 1.0, "miss": 0.0}
    for bad in ("hit=1,teapot=2", "hit=x", "hit", "hit=0,miss=0", "hit=-1", "", "hit=1,,miss=1"):
        with pytest.raises(SystemExit):
            _parse_mix(bad)
    assert _parse_env(["LRU_CACHE_CAPACITY=64", "EMPTY=", "A_B=x=y"]) == {"LRU_CACHE_CAPACITY": "64", "EMPTY": "",
                                                                          "A_B": "x=y"}
    for bad in (["NOVALUE"], ["=1"], ["1A=2"], ["A-B=1"], ["A B=1"]):
        with pytest.raises(SystemExit):
            _parse_env(bad)


def test_soak_cli_refuses_bad_options_before_starting_a_server(capsys):
    from cfic.api.loadtest import main

    for argv in (["--soak", "--mix", "hit=1,teapot=1"], ["--soak", "--server-env", "NOPE"],
                 ["--soak", "--cache-bytes", "lots"], ["--soak", "--seconds", "0"], ["--soak", "--seconds", "7200"],
                 ["--soak", "--clients", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code not in (0, None), argv


async def _serve_once(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_raw_client_hangs_up_with_a_fin_or_a_reset_and_never_waits_past_close_after():
    """The disconnecting kinds must really hang up as a client would: a FIN (orderly close) or a RST (a killed
    client), seen as such by the server; and a hang-up before any answer is "closed", not a status."""
    from cfic.api.loadtest import Probe, _raw_exchange

    seen: list[str] = []
    got_request = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        try:
            seen.append("fin" if await reader.read(100) == b"" else "data")
        except ConnectionResetError:
            seen.append("rst")
        writer.close()

    server, port = await _serve_once(silent)
    async with server:
        for reset, close_after in ((False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)):
            got_request.clear()
            started = asyncio.get_running_loop().time()
            status = await _raw_exchange(port, Probe(raw=b"POST /ground HTTP/1.1\r\nHost: x\r\n\r\n",
                                                     close_after=close_after, reset=reset), timeout=10)
            assert status == "closed"
            assert asyncio.get_running_loop().time() - started < close_after + 2
            for _ in range(200):
                if len(seen) == 1:
                    break
                await asyncio.sleep(0.01)
            assert seen == ["rst" if reset else "fin"], (reset, close_after, seen)
            seen.clear()


async def test_raw_client_reads_the_status_and_tells_a_dropped_connection_from_its_own_hang_up():
    from cfic.api.loadtest import Probe, _raw_exchange

    async def teapot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # no answer at all

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"hello\r\n")
        await writer.drain()
        writer.close()

    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for handler, expected in ((teapot, "418"), (hang_up, "dropped"), (garbage, "malformed_answer")):
        server, port = await _serve_once(handler)
        async with server:
            assert await _raw_exchange(port, Probe(raw=request), timeout=10) == expected
            # a disconnecting client that gets an answer (or is dropped) before it hangs up says so
            assert await _raw_exchange(port, Probe(raw=request, close_after=5.0), timeout=10) == expected


def test_rss_figures_bound_peak_and_what_the_cache_does_not_explain():
    from cfic.api.loadtest import RSS_ALLOWANCE, _rss_figures

    mib = 2**20
    samples = [(0.0, 1000.0), (1.0, 1100.0), (2.0, 1050.0), (3.0, 1080.0)]
    cache_before = {"bytes": 50 * mib, "evictions": 0}
    cache_after = {"bytes": 120 * mib, "evictions": 3}
    r = _rss_figures(128 * mib, samples, 700.0, 900.0, 1000.0, 1010.0, 1010.0, cache_before, cache_after)
    assert r["peak"] == 1100.0 and r["end"] == 1080.0  # VmHWM did not rise during the soak: the samples' peak
    assert r["bound"] == round((900.0 + 128) * (1 + RSS_ALLOWANCE), 1)  # from the model serving one request
    assert r["after_load"] == 700.0 and r["model"] == 900.0
    assert r["allowance_share"] == RSS_ALLOWANCE  # a share: not rounded to one decimal (0.15 is not 0.1)
    assert r["cache_filled"] is True and r["cache_end"] == 120.0 and r["beyond_cache"] == 1080.0 - 900.0 - 120.0
    assert r["quarters"] == [1100.0, 1050.0, 1080.0, 1080.0]  # the first sample at or after each quarter
    spiked = _rss_figures(128 * mib, samples, 700.0, 900.0, 1000.0, 1010.0, 1234.5, cache_before,
                          {"bytes": 60 * mib, "evictions": 0})
    assert spiked["peak"] == 1234.5  # a spike between two samples shows in VmHWM
    assert spiked["cache_filled"] is False


def test_server_log_error_lines_in_cfic_and_uvicorn_formats():
    from cfic.api.loadtest import _log_errors

    log = "\n".join([
        "2026-12-03 04:00:00,000 INFO cfic.api: abc POST /ground 422 3.1ms",
        "2026-12-03 04:00:01,000 WARNING cfic.api: listening on 127.0.0.1",
        "2026-12-03 04:00:02,000 ERROR cfic.api: internal error in request abc: KeyError: 'x'",
        "ERROR:    Exception in ASGI application",
        "Traceback (most recent call last):",
        "INFO:     Shutting down",
    ])
    assert _log_errors(log) == [
        "2026-12-03 04:00:02,000 ERROR cfic.api: internal error in request abc: KeyError: 'x'",
        "ERROR:    Exception in ASGI application",
        "Traceback (most recent call last):",
    ]


def test_every_soak_kind_builds_a_request_and_the_bad_ones_are_really_bad():
    """Each kind's builder runs, and each oversize kind exceeds the limit it names (a bad input that is in fact
    acceptable would make the soak fail for the wrong reason, or pass without testing anything)."""
    import random

    from cfic.api.loadtest import BAD_GROUPS, SOAK_GROUPS, SoakRequests, make_document

    rng = random.Random(0)
    text, questions = make_document(rng, 60, "p0")
    requests = SoakRequests(rng, 60, [([{"id": "p0", "text": text}], questions)])
    lim = requests.limits
    assert {g for g, _, _ in requests.kinds.values()} == set(SOAK_GROUPS)
    for name, (group, expected, _) in requests.kinds.items():
        probe = requests.build(name)
        assert (probe.raw is not None) or probe.body or probe.method == "GET" or name == "empty_body", name
        if group in BAD_GROUPS:
            assert expected and 200 not in expected, name
        if group == "disconnect":
            assert probe.raw is not None and probe.close_after is not None, name
    body = json.loads(requests.build("total_chars_too_long").body)
    assert sum(len(d["text"]) for d in body["documents"]) > lim.max_total_chars
    assert all(len(d["text"]) <= lim.max_document_chars for d in body["documents"])
    assert len(json.loads(requests.build("too_many_documents").body)["documents"]) > lim.max_documents
    assert len(json.loads(requests.build("query_too_long").body)["query"]) > lim.max_query_chars
    assert max(len(d["text"]) for d in json.loads(requests.build("document_too_long").body)["documents"]) \
        > lim.max_document_chars
    # every kind of a group is dealt once before any is dealt twice
    malformed = [k for k, (g, _, _) in requests.kinds.items() if g == "malformed"]
    assert sorted(requests.pick("malformed") for _ in malformed) == sorted(malformed)

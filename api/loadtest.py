"""Load test of ``cfic serve`` on the loopback interface: ``python -m cfic.api.loadtest``.

Starts its own server (``python -m cfic.api.cli``) on 127.0.0.1 and a free port -- it never targets any other
address -- then runs bounded phases of N concurrent clients for M seconds each:

- ``unique``: every request brings a document the server has never seen (every request pays the prefill);
- ``repeated``: requests ask new questions about a small pool of documents already in the encoding cache;
- ``overload``: many more clients than the queue holds, to show the 503 + Retry-After back-pressure.

It reports throughput, p50/p95 latency, the share of 503s and other errors, the share of cached document tokens and
the server's peak RSS (VmHWM), then checks that the server still answers, and stops it. Every loop is bounded in
time; the whole run ends by itself.

``--soak`` (default 8 clients for 120 s) mixes, request after request, cache hits, cache misses, each oversize and
malformed input the API refuses, and clients that hang up mid-request, and fails (exit 1) unless every answer is
200, 4xx, 503 or 504, no bad input is accepted, every bad kind was tried, the server is alive afterwards (and logged
no error), and its RSS stays within the bound: (the model serving one request + the encoding-cache limit) plus an
allowance. The soak's cache limit defaults to 128MiB, small enough to be filled, so the bound is a real test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cfic.eval.metrics import percentile

HOST = "127.0.0.1"  # loopback only, by construction
# The server's stage timings averaged into a report (``stages_ms`` of every answer).
STAGES = ("queue_ms", "encode_ms", "reading_ms", "prefix_ms", "skip_ms")

_PLACES = ["Avalon", "Brightwater", "Caldera", "Dunmore", "Eastfield", "Falkirk", "Glenhaven", "Harrowgate",
           "Ironbridge", "Juniper Bay", "Kestrel Point", "Lowmoor", "Marston", "Northwick", "Oakridge", "Pembury"]
_PEOPLE = ["Ada Lindqvist", "Bruno Okafor", "Clara Mendes", "Dmitri Volkov", "Elena Rossi", "Farid Haddad",
           "Grace Whitman", "Hiro Tanaka", "Ines Duarte", "Jonas Berg", "Kofi Mensah", "Lena Novak"]
_THINGS = ["bridge", "library", "observatory", "harbour", "railway station", "museum", "hospital", "canal",
           "lighthouse", "university", "market hall", "water mill", "cathedral", "botanical garden"]
_VERBS = ["built", "designed", "restored", "opened", "expanded", "funded", "documented", "rebuilt"]
_FILLER = [
    "The town council met every spring to discuss the budget and the state of the roads.",
    "Local historians disagree about the exact origin of the name.",
    "Visitors often remark on the quiet streets and the old stone houses.",
    "The weather in the region is mild, with frequent rain in the autumn months.",
    "Several families have lived in the area for more than five generations.",
    "A weekly newspaper reported on fairs, elections and the price of grain.",
    "The surrounding farmland produces wheat, barley and apples.",
    "In winter the river sometimes freezes near the old ford.",
    "Records from that period are incomplete because of a fire in the archive.",
    "The school taught reading, arithmetic and music to the children of the district.",
]


def make_document(rng: random.Random, words: int, tag: str) -> tuple[str, list[str]]:
    """A synthetic document of about ``words`` words with checkable facts, and questions about those facts."""
    sentences: list[str] = []
    questions: list[str] = []
    place = rng.choice(_PLACES)
    sentences.append(f"Report {tag}: notes on the history of {place}.")
    while sum(len(s.split()) for s in sentences) < words:
        if rng.random() < 0.4:
            person, thing, verb = rng.choice(_PEOPLE), rng.choice(_THINGS), rng.choice(_VERBS)
            year = rng.randint(1700, 2020)
            sentences.append(f"In {year}, {person} {verb} the {thing} of {place}.")
            questions.append(rng.choice([f"Who {verb} the {thing} of {place}?", f"When was the {thing} {verb}?",
                                         f"What did {person} do in {year}?"]))
        else:
            sentences.append(rng.choice(_FILLER))
    paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs), questions or [f"What is known about {place}?"]


@dataclass
class Sample:
    status: int
    latency_ms: float
    usage: dict = field(default_factory=dict)


@dataclass
class PhaseReport:
    name: str
    clients: int
    seconds: float
    requests: int = 0
    ok: int = 0
    rejected_503: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    cached_token_share: float = 0.0
    mean_server_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    load_average_1m: float | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _proc_status(pid: int, key: str) -> float | None:
    """A ``/proc/<pid>/status`` memory field in MiB (Linux); None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _client_loop(client, stop_at: float, make_request, samples: list[Sample], backoff_s: float) -> None:
    import httpx

    while time.monotonic() < stop_at:
        body = make_request()
        t0 = time.perf_counter()
        try:
            r = await client.post("/ground", json=body)
        except httpx.HTTPError:
            samples.append(Sample(-1, (time.perf_counter() - t0) * 1000))
            await asyncio.sleep(backoff_s)
            continue
        latency = (time.perf_counter() - t0) * 1000
        if r.status_code == 200:
            samples.append(Sample(200, latency, r.json()["usage"]))
        else:
            samples.append(Sample(r.status_code, latency))
            if r.status_code == 503:
                await asyncio.sleep(backoff_s)


async def _run_phase(base_url: str, name: str, clients: int, seconds: float, make_request, pid: int,
                     backoff_s: float) -> PhaseReport:
    import httpx

    samples: list[Sample] = []
    peak = [0.0]
    stop_at = time.monotonic() + seconds

    async def watch_memory() -> None:
        while time.monotonic() < stop_at:
            rss = _proc_status(pid, "VmRSS")
            if rss is not None:
                peak[0] = max(peak[0], rss)
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(watch_memory(), *[_client_loop(client, stop_at, make_request, samples, backoff_s)
                                               for _ in range(clients)])
        elapsed = time.monotonic() - started
    ok = [s for s in samples if s.status == 200]
    report = PhaseReport(name, clients, round(elapsed, 1), requests=len(samples), ok=len(ok),
                         rejected_503=sum(s.status == 503 for s in samples))
    for s in samples:
        if s.status not in (200, 503):
            key = "transport" if s.status < 0 else str(s.status)
            report.other_errors[key] = report.other_errors.get(key, 0) + 1
    report.throughput_rps = round(len(ok) / elapsed, 2) if elapsed else 0.0
    latencies = sorted(s.latency_ms for s in ok)
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    report.p50_ms = None if p50 is None else round(p50, 1)
    report.p95_ms = None if p95 is None else round(p95, 1)
    doc_tokens = sum(s.usage["input_tokens"] for s in ok)
    cached = sum(s.usage["cached_tokens"] for s in ok)
    report.cached_token_share = round(cached / doc_tokens, 3) if doc_tokens else 0.0
    if ok:  # where the server's time went, on average
        report.mean_server_ms = {"latency_ms": round(statistics.fmean(s.usage["latency_ms"] for s in ok), 1)}
        for k in STAGES:
            report.mean_server_ms[k] = round(statistics.fmean(s.usage["stages_ms"][k] for s in ok), 1)
    report.peak_rss_mib = round(peak[0], 1) if peak[0] else None
    report.load_average_1m = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return report


def _start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cfic.api.cli", "--host", HOST, "--port", str(port), "--log-level", "warning",
           "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch), "--timeout", str(args.timeout),
           "--cache-bytes", args.cache_bytes]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.server_threads:  # torch reads these at import: the server's intra-op threads
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.server_threads)
    env.pop("CFIC_API_KEY", None)  # the load test talks to its own unauthenticated loopback server
    env.update(_parse_env(getattr(args, "server_env", None) or []))  # e.g. to try a fix: LRU_CACHE_CAPACITY=...
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _parse_env(items: list[str]) -> dict[str, str]:
    """``--server-env NAME=VALUE`` items as a dict (SystemExit on a malformed one, before any server starts)."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not (name[0].isalpha() or name[0] == "_") \
                or not all(c.isalnum() or c == "_" for c in name):
            raise SystemExit(f"--server-env: {item!r} is not NAME=VALUE")
        env[name] = value
    return env


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s")


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    port = _free_port()
    base_url = f"http://{HOST}:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="cfic-loadtest-"))
    log_path = workdir / "server.log"
    proc = _start_server(args, port, log_path)
    result: dict = {"command": " ".join([Path(sys.executable).name, "-m", "cfic.api.loadtest", *sys.argv[1:]]),
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "cpu_count": os.cpu_count(), "phases": []}
    if hasattr(os, "getloadavg"):
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    try:
        result["startup_s"] = round(_wait_ready(base_url, proc, args.startup_timeout), 1)
        counter = [0]

        def unique_request() -> dict:
            counter[0] += 1
            docs, questions = [], []
            for d in range(args.docs_per_request):
                text, qs = make_document(rng, args.doc_words, f"u{counter[0]}-{d}")
                docs.append({"id": f"u{counter[0]}-{d}", "text": text})
                questions.extend(qs)
            return {"query": rng.choice(questions), "documents": docs}

        pool = []
        for p in range(args.pool):
            docs, questions = [], []
            for d in range(args.docs_per_request):
                text, qs = make_document(rng, args.doc_words, f"p{p}-{d}")
                docs.append({"id": f"p{p}-{d}", "text": text})
                questions.extend(qs)
            pool.append((docs, questions))

        def repeated_request() -> dict:
            docs, questions = rng.choice(pool)
            return {"query": rng.choice(questions), "documents": docs}

        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
        for name in phases:
            if name == "unique":
                report = asyncio.run(_run_phase(base_url, "unique documents (cache misses)", args.clients,
                                                args.seconds, unique_request, proc.pid, args.backoff))
            elif name == "repeated":
                import httpx

                with httpx.Client(base_url=base_url, timeout=300) as c:  # warm the cache, unmeasured
                    for docs, questions in pool:
                        c.post("/ground", json={"query": questions[0], "documents": docs}).raise_for_status()
                report = asyncio.run(_run_phase(base_url, "repeated documents (cache hits)", args.clients,
                                                args.seconds, repeated_request, proc.pid, args.backoff))
            elif name == "overload":
                clients = args.overload_clients or 2 * (args.max_queue + args.max_batch)
                report = asyncio.run(_run_phase(base_url, "overload (unique documents)", clients,
                                                args.overload_seconds or args.seconds, unique_request, proc.pid,
                                                args.backoff))
            else:
                raise SystemExit(f"unknown phase {name!r}; use unique, repeated, overload")
            result["phases"].append(asdict(report))
            print(_format_phase(report), flush=True)

        import httpx

        with httpx.Client(base_url=base_url, timeout=300) as c:
            health = c.get("/healthz").status_code
            # Let the backlog of the last phase drain (bounded), then ask again, honouring Retry-After.
            drain_until = time.monotonic() + args.timeout + 60
            while c.get("/stats").json()["queue_depth"] and time.monotonic() < drain_until:
                time.sleep(0.5)
            docs, questions = pool[0] if pool else ([{"text": "A short document. It has two sentences."}], ["q"])
            for _ in range(5):
                after = c.post("/ground", json={"query": questions[0], "documents": docs})
                if after.status_code != 503:
                    break
                time.sleep(min(30, int(after.headers.get("retry-after", "1"))))
            stats = c.get("/stats").json()
        result["after"] = {"healthz": health, "ground": after.status_code,
                           "verbatim": all(ev["text"] == docs[ev["document_index"]]["text"][
                               ev["start_char"]:ev["end_char"]] for ev in after.json().get("evidence", []))
                           if after.status_code == 200 else None}
        result["server_stats"] = stats
        result["server_peak_rss_mib"] = _proc_status(proc.pid, "VmHWM")
    finally:
        _stop_server(proc)
        result["server_exit_code"] = proc.returncode
        result["server_log"] = str(log_path)
    return result


def _format_phase(r: PhaseReport) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.other_errors.items())) or "none"
    share = f"{100 * r.rejected_503 / r.requests:.1f}%" if r.requests else "n/a"
    return (f"{r.name}: {r.clients} clients x {r.seconds} s: {r.requests} requests, {r.ok} ok, "
            f"{r.throughput_rps} req/s, p50 {r.p50_ms} ms, p95 {r.p95_ms} ms, 503s {r.rejected_503} ({share}), "
            f"other errors {errors}, cached token share {r.cached_token_share}, peak RSS {r.peak_rss_mib} MiB, "
            f"server time (mean ms) {r.mean_server_ms}, load average {r.load_average_1m}")


def markdown(result: dict) -> str:
    lines = ["| phase | clients | s | requests | ok | req/s | p50 ms | p95 ms | 503 share | other errors | "
             "cached token share | peak RSS MiB |", "|---" * 12 + "|"]
    for r in result["phases"]:
        share = f"{100 * r['rejected_503'] / r['requests']:.1f}%" if r["requests"] else "n/a"
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["other_errors"].items())) or "0"
        lines.append(f"| {r['name']} | {r['clients']} | {r['seconds']} | {r['requests']} | {r['ok']} | "
                     f"{r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | {share} | {errors} | "
                     f"{r['cached_token_share']} | {r['peak_rss_mib']} |")
    return "\n".join(lines)


# ================================================================================================== soak mode
# ``--soak``: N clients for M seconds, each picking at random, request after request, among cache hits, cache misses,
# oversize and malformed requests, and clients that disconnect mid-request. Every response is counted by kind and
# status. The run fails (exit 1) when a status outside 200/4xx/503/504 appears (a 5xx other than 503/504, a dropped
# connection, a client timeout), when a bad input is answered 200, when the server is not alive afterwards
# (``/healthz`` and a real ``/ground`` must answer 200), or when the server's peak RSS exceeds its bound.

# Share of the bound added on top of (the model serving one request + the encoding-cache limit). The cache limit
# counts KV tensors only; besides them the server legitimately holds: the encodings of the worker turn in progress
# (kept by the turn even when the cache evicts them or has no room yet), activations of passes longer than the first
# request's, per-request Python objects and freed memory that the allocator keeps mapped. Memory that keeps growing
# with the number of requests (a leak, or a cache without a byte bound) is what the bound is for.
RSS_ALLOWANCE = 0.15
# Weights per request. A hit or miss holds its client for seconds (the model is one worker on a 2-core CPU, queue
# included), a bad input for milliseconds, so time goes to the model whatever the weights; the bad inputs are
# weighted up so that in 120 s each of their ~40 kinds is tried a few times (about 200 requests in all, half of
# them malformed, on the reference machine).
DEFAULT_MIX = "hit=4,miss=2,oversize=4,malformed=16,disconnect=2"
# The soak's default encoding-cache limit: the bound "RSS <= model + cache limit" only tests something once the cache
# is full. On the default model (bfloat16 KV, 23 KB per token) a soak document of 300 words (~470 tokens) is ~11 MiB
# of KV: the 8 pool documents hold ~90 MiB, and the ~100 new documents of a 120 s soak fill the rest and make it
# evict. Not smaller: between two hits on one pool document come ~8 new documents, which must not push it out
# (with 128MiB, a 20 s trial's "hits" were a third misses).
SOAK_CACHE_BYTES = "256MiB"
SOAK_GROUPS = ("hit", "miss", "oversize", "malformed", "disconnect")
BAD_GROUPS = ("oversize", "malformed")


def _allowed_status(status: str, group: str) -> bool:
    """200, any 4xx, 503 and 504 are answers a client can act on; "closed" (the client itself hung up before any
    answer) is expected of the disconnecting clients only. Anything else -- another 5xx, a connection the server
    dropped or reset without an answer ("dropped", "transport:..."), a garbled answer, a client timeout -- is a
    server failure."""
    if status == "closed":
        return group == "disconnect"
    if not status.isdigit():
        return False
    code = int(status)
    return code == 200 or 400 <= code < 500 or code in (503, 504)


@dataclass
class Probe:
    """One request of the soak. ``raw``: bytes sent as-is on a fresh connection (for what httpx refuses to send:
    malformed headers, a partial body); otherwise ``method``/``path``/``headers``/``body`` go through httpx."""

    method: str = "POST"
    path: str = "/ground"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    body: bytes = b""
    raw: bytes | None = None
    close_after: float | None = None  # disconnect kinds: hang up after this many seconds without an answer
    reset: bool = False  # disconnect kinds: hang up with a TCP reset (SO_LINGER 0) instead of a FIN


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _raw_post(body: bytes, *, content_length: str | list[str] | None = None, extra: str = "") -> bytes:
    lengths = content_length if isinstance(content_length, list) else [content_length or str(len(body))]
    head = f"POST /ground HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    head += "".join(f"Content-Length: {v}\r\n" for v in lengths)
    return (head + extra + "\r\n").encode("latin-1") + body


class SoakRequests:
    """The soak's request kinds: ``kinds[name] = (group, expected statuses, builder)``; a builder returns a Probe.

    Hits ask about a small pool of documents sent (and cached) before the soak; misses bring a new document.
    The bad inputs are valid requests about a pool document with one thing wrong, so that one reaching the model
    would be cheap -- except ``whitespace_query``, which brings a new document: it shows that a blank query is refused
    by the schema before the document's prefill (its p50 is that of the other 422s). ``expected`` is the API's
    documented answer; a different 4xx (or a 503/504 for a bad input that reached the model queue) is allowed but
    shown."""

    def __init__(self, rng: random.Random, doc_words: int, pool: list[tuple[list[dict], list[str]]]):
        from cfic.api.settings import ServiceSettings

        self.rng, self.doc_words, self.pool, self.counter = rng, doc_words, pool, 0
        self.limits = ServiceSettings()  # the server runs with the default limits
        lim = self.limits
        self.kinds: dict[str, tuple[str, tuple[int, ...], object]] = {
            "hit": ("hit", (200,), lambda: self._ok(self._pool_body())),
            "miss": ("miss", (200,), lambda: self._ok(self._fresh_body())),
            # oversize: each limit of the server, just exceeded
            "too_many_documents": ("oversize", (413,), lambda: self._ok(self._pool_body(
                documents=[{"text": f"Document {i}. It is short."} for i in range(lim.max_documents + 1)]))),
            "document_too_long": ("oversize", (413,), lambda: self._ok(self._pool_body(
                documents=[{"text": self._text(lim.max_document_chars + 1)}]))),
            "total_chars_too_long": ("oversize", (413,), lambda: self._ok(self._pool_body(
                documents=[{"text": self._text(lim.max_total_chars // 2 + 1)} for _ in range(2)]))),
            "query_too_long": ("oversize", (413,), lambda: self._ok(self._pool_body(
                query="Who built it? " * (lim.max_query_chars // 14 + 1)))),
            "body_too_large": ("oversize", (413,), lambda: Probe(  # declared, never sent: refused on the headers
                raw=_raw_post(b"", content_length=str(lim.max_request_bytes + 1)))),
            # malformed: broken JSON, wrong types and values, wrong content types, methods and paths
            "invalid_json": ("malformed", (400,), lambda: Probe(body=b'{"query": "Who?", "documents": [')),
            "not_utf8": ("malformed", (400,), lambda: Probe(body=b'{"query": "Who \xff\xfe?", "documents": []}')),
            "deep_nesting": ("malformed", (400, 422), lambda: Probe(
                body=b'{"query": "Who?", "documents": [{"text": "A.", "metadata": {"a": '
                     + b"[" * 100_000 + b"]" * 100_000 + b"}}]}")),
            "empty_body": ("malformed", (422,), lambda: Probe(body=b"")),
            "json_array_body": ("malformed", (422,), lambda: Probe(body=b"[]")),
            "json_null_body": ("malformed", (422,), lambda: Probe(body=b"null")),
            "missing_query": ("malformed", (422,), lambda: self._ok(self._pool_body(drop="query"))),
            "missing_documents": ("malformed", (422,), lambda: self._ok(self._pool_body(drop="documents"))),
            "empty_query": ("malformed", (422,), lambda: self._ok(self._pool_body(query=""))),
            "whitespace_query": ("malformed", (422,), lambda: self._ok(self._fresh_body(query=" \n\t "))),
            "empty_documents": ("malformed", (422,), lambda: self._ok(self._pool_body(documents=[]))),
            "empty_text": ("malformed", (422,), lambda: self._ok(self._pool_body(documents=[{"text": ""}]))),
            "whitespace_text": ("malformed", (422,), lambda: self._ok(self._pool_body(
                documents=[{"text": "  \n\n \t "}]))),
            "document_as_string": ("malformed", (422,), lambda: self._ok(self._pool_body(documents=["A text."]))),
            "metadata_not_object": ("malformed", (422,), lambda: self._ok(self._pool_body(
                documents=[{"text": "A short text.", "metadata": "x"}]))),
            "id_too_long": ("malformed", (422,), lambda: self._ok(self._pool_body(
                documents=[{"id": "x" * 257, "text": "A short text."}]))),
            "top_k_string": ("malformed", (422,), lambda: self._ok(self._pool_body(top_k="3"))),
            "top_k_bool": ("malformed", (422,), lambda: self._ok(self._pool_body(top_k=True))),
            "top_k_negative": ("malformed", (422,), lambda: self._ok(self._pool_body(top_k=-3))),
            "top_k_fraction": ("malformed", (422,), lambda: self._ok(self._pool_body(top_k=2.5))),
            "top_k_huge": ("malformed", (422,), lambda: self._ok(self._pool_body(top_k=10**30))),
            "max_span_tokens_zero": ("malformed", (422,), lambda: self._ok(self._pool_body(max_span_tokens=0))),
            "threshold_out_of_range": ("malformed", (422,), lambda: self._ok(self._pool_body(threshold=1.5))),
            "threshold_string": ("malformed", (422,), lambda: self._ok(self._pool_body(threshold="0.5"))),
            "threshold_nan": ("malformed", (422,), lambda: Probe(  # json.dumps writes NaN, Python's parser reads it
                body=_json(self._pool_body(threshold=float("nan"))))),
            "unknown_field": ("malformed", (422,), lambda: self._ok(self._pool_body(temperature=0.7))),
            "query_lone_surrogate": ("malformed", (422,), lambda: Probe(
                body=_json(self._pool_body(query="Who\ud800?")))),  # json.dumps escapes it as \ud800
            "text_plain": ("malformed", (415,), lambda: self._ok(self._pool_body(),
                                                                   headers={"Content-Type": "text/plain"})),
            "no_content_type": ("malformed", (415,), lambda: self._ok(self._pool_body(), headers={})),
            "latin1_charset": ("malformed", (415,), lambda: self._ok(self._pool_body(), headers={
                "Content-Type": "application/json; charset=latin-1"})),
            "get_ground": ("malformed", (405,), lambda: Probe(method="GET", headers={})),
            "unknown_path": ("malformed", (404,), lambda: self._ok(self._pool_body(), path="/grounds")),
            "negative_content_length": ("malformed", (400,), lambda: Probe(
                raw=_raw_post(b"", content_length="-1"))),
            "conflicting_content_length": ("malformed", (400,), lambda: Probe(
                raw=_raw_post(b"{}", content_length=["2", "3"]))),
            # disconnect: a real request (a new document, so the model has work to stop), then the client hangs up:
            # early ones leave a queued job behind, late ones (10 s) more often running work the worker must stop
            "disconnect_waiting": ("disconnect", (), lambda: Probe(
                raw=_raw_post(_json(self._fresh_body())), close_after=self.rng.choice([0.0, 0.1, 1.0, 3.0, 10.0]))),
            "disconnect_reset": ("disconnect", (), lambda: Probe(
                raw=_raw_post(_json(self._fresh_body())), close_after=self.rng.choice([0.0, 0.5, 2.0, 10.0]),
                reset=True)),
            "disconnect_upload": ("disconnect", (), lambda: self._partial_upload()),
        }
        self._decks: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ bodies
    def _text(self, chars: int) -> str:
        """At least ``chars`` characters of synthetic prose."""
        text = ""
        while len(text) < chars:
            self.counter += 1
            text += make_document(self.rng, 400, f"x{self.counter}")[0] + "\n\n"
        return text[:chars]

    def _pool_body(self, drop: str | None = None, **changes) -> dict:
        docs, questions = self.rng.choice(self.pool)
        body = {"query": self.rng.choice(questions), "documents": docs, **changes}
        if drop:
            body.pop(drop)
        return body

    def _fresh_body(self, **changes) -> dict:
        self.counter += 1
        text, questions = make_document(self.rng, self.doc_words, f"m{self.counter}")
        return {"query": self.rng.choice(questions), "documents": [{"id": f"m{self.counter}", "text": text}],
                **changes}

    @staticmethod
    def _ok(body: dict, headers: dict[str, str] | None = None, path: str = "/ground") -> Probe:
        return Probe(path=path, body=_json(body),
                     headers={"Content-Type": "application/json"} if headers is None else headers)

    def _partial_upload(self) -> Probe:
        body = _json(self._fresh_body())
        return Probe(raw=_raw_post(body[: len(body) // 2], content_length=str(len(body))),
                     close_after=self.rng.choice([0.0, 0.5]))

    # ------------------------------------------------------------------ choice
    def pick(self, group: str) -> str:
        """Hits and misses are one kind each; the other groups deal their kinds from a shuffled deck, refilled
        when empty, so every kind is tried once before any is tried twice (short runs still cover them all)."""
        if group in ("hit", "miss"):
            return group
        deck = self._decks.setdefault(group, [])
        if not deck:
            deck.extend(k for k, (g, _, _) in self.kinds.items() if g == group)
            self.rng.shuffle(deck)
        return deck.pop()

    def build(self, kind: str) -> Probe:
        return self.kinds[kind][2]()


@dataclass
class Outcome:
    kind: str
    status: str
    latency_ms: float
    usage: dict | None = None
    retry_after: float | None = None  # a 503's Retry-After (s), which the soak's clients honour (capped)


# A soak client waits out a 503's Retry-After, as a well-behaved client would, but at most this long: the server's
# estimate follows its recent per-job time and can say two minutes, longer than the soak itself.
RETRY_AFTER_CAP_S = 10.0


def _status_of(line: bytes) -> str:
    """The status of an HTTP/1.1 answer from its first line. An empty line means the server closed the connection
    without answering ("dropped": a failure, unlike "closed", which is the client's own hang-up)."""
    if not line:
        return "dropped"
    parts = line.split()
    return parts[1].decode("latin-1") if len(parts) >= 2 and parts[0].startswith(b"HTTP/") else "malformed_answer"


# struct linger {int l_onoff; int l_linger;}: on, 0 s -- close() then discards unsent data and sends a RST.
_LINGER_RESET = struct.pack("ii", 1, 0)


async def _raw_exchange(port: int, probe: Probe, timeout: float) -> str:
    """Send ``probe.raw`` on a fresh connection. With ``close_after`` set: hang up after that long unless an answer
    came first ("closed", or the answer's status; "dropped" when the server hung up first without one); otherwise
    read the status line of the answer. Raw sockets, not httpx: httpx refuses to send malformed headers or a body
    shorter than its Content-Length, and cannot hang up with a RST."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        writer.write(probe.raw or b"")
        await writer.drain()
        if probe.close_after is None:
            return _status_of(await asyncio.wait_for(reader.readline(), timeout))
        if probe.close_after > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), probe.close_after)
            except TimeoutError:
                return "closed"
            return _status_of(line)
        return "closed"
    finally:
        if probe.reset:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends a RST, as a killed client would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


def _parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in SOAK_GROUPS:
            raise SystemExit(f"--mix: unknown kind {name!r}; use {', '.join(SOAK_GROUPS)}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise SystemExit(f"--mix: {part!r} is not name=weight") from None
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise SystemExit("--mix: weights must be >= 0 and not all 0")
    return mix


async def _soak_clients(base_url: str, port: int, args: argparse.Namespace, requests: SoakRequests,
                        mix: dict[str, float], pid: int, proc: subprocess.Popen) -> tuple[list[Outcome], dict]:
    import httpx

    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    exited_at: list[float] = []
    done = asyncio.Event()
    groups, weights = list(mix), list(mix.values())
    client_timeout = args.timeout + 30  # the server answers every request within its timeout: 30 s of slack
    t0 = time.monotonic()
    stop_at = t0 + args.seconds

    async def sample_rss() -> None:
        while not done.is_set():
            value = _proc_status(pid, "VmRSS")
            if value is not None:
                rss.append((round(time.monotonic() - t0, 1), round(value, 1)))
            if proc.poll() is not None and not exited_at:
                exited_at.append(round(time.monotonic() - t0, 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), args.rss_interval)

    async def one(client: httpx.AsyncClient, kind: str) -> Outcome:
        probe = requests.build(kind)
        started = time.perf_counter()
        usage = retry_after = None
        try:
            if probe.raw is not None:
                status = await _raw_exchange(port, probe, client_timeout)
            else:
                r = await client.request(probe.method, probe.path, content=probe.body or None,
                                         headers=probe.headers)
                status = str(r.status_code)
                if r.status_code == 200 and probe.path == "/ground":
                    usage = r.json()["usage"]
                if r.status_code == 503:
                    with contextlib.suppress(ValueError):
                        retry_after = float(r.headers.get("retry-after", ""))
        except (httpx.TimeoutException, TimeoutError):
            status = "client_timeout"
        except (httpx.HTTPError, OSError) as exc:
            status = f"transport:{type(exc).__name__}"
        except (ValueError, KeyError, TypeError):  # a 200 whose body is not the documented JSON
            status = "malformed_answer"
        return Outcome(kind, status, (time.perf_counter() - started) * 1000, usage, retry_after)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            group = requests.rng.choices(groups, weights)[0]
            outcome = await one(client, requests.pick(group))
            outcomes.append(outcome)
            if outcome.status == "503" or (not outcome.status[:1].isdigit() and outcome.status != "closed"):
                pause = min(outcome.retry_after or args.backoff, RETRY_AFTER_CAP_S)
                await asyncio.sleep(max(0.0, min(pause, stop_at - time.monotonic())))

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(client_timeout, connect=10)
    sampler = asyncio.ensure_future(sample_rss())
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(args.clients)])
    elapsed = time.monotonic() - t0
    done.set()
    await sampler
    return outcomes, {"elapsed_s": round(elapsed, 1), "rss_samples": rss,
                      "server_exited_at_s": exited_at[0] if exited_at else None}


def _latency(values: list[float]) -> dict:
    values = sorted(values)
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return {"p50_ms": None if p50 is None else round(p50, 1), "p95_ms": None if p95 is None else round(p95, 1)}


def summarise_kinds(outcomes: list[Outcome], requests: SoakRequests) -> dict[str, dict]:
    kinds: dict[str, dict] = {}
    for name, (group, expected, _) in requests.kinds.items():
        mine = [o for o in outcomes if o.kind == name]
        statuses: dict[str, int] = {}
        for o in mine:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        entry = {"group": group, "expected": list(expected), "requests": len(mine),
                 "statuses": dict(sorted(statuses.items())),
                 "latency_all": _latency([o.latency_ms for o in mine]),
                 "latency_200": _latency([o.latency_ms for o in mine if o.status == "200"])}
        ok = [o.usage for o in mine if o.usage]
        if ok and group in ("hit", "miss"):
            doc_tokens = sum(u["input_tokens"] for u in ok)
            entry["cached_token_share"] = round(sum(u["cached_tokens"] for u in ok) / doc_tokens, 3) \
                if doc_tokens else 0.0
            entry["mean_server_ms"] = {k: round(statistics.fmean(u["stages_ms"][k] for u in ok), 1)
                                       for k in STAGES}
        kinds[name] = entry
    return kinds


def soak_failures(result: dict) -> list[str]:
    """Why a soak result fails its invariants (empty: it passed). Pure: the test also feeds it doctored results."""
    failures: list[str] = []
    for name, k in result["kinds"].items():
        bad = {s: n for s, n in k["statuses"].items() if not _allowed_status(s, k["group"])}
        if bad:
            failures.append(f"{name}: statuses outside 200/4xx/503/504: {bad}")
        if k["group"] in BAD_GROUPS:
            if not k["requests"]:
                failures.append(f"{name}: never tried (run longer)")
            elif k["statuses"].get("200"):
                failures.append(f"{name}: a bad input was accepted (200 x {k['statuses']['200']})")
    if not any(k["statuses"].get("200") for k in result["kinds"].values() if k["group"] in ("hit", "miss")):
        failures.append("no hit or miss request was answered 200")
    if result.get("server_exited_at_s") is not None:
        failures.append(f"the server exited during the soak (at {result['server_exited_at_s']} s)")
    after = result.get("after") or {}
    if after.get("healthz") != 200 or after.get("ground") != 200 or after.get("verbatim") is not True:
        failures.append(f"the server is not alive after the soak: {after}")
    rss = result.get("rss_mib") or {}
    if rss.get("peak") is not None and rss.get("bound") is not None and rss["peak"] > rss["bound"]:
        failures.append(f"peak RSS {rss['peak']} MiB exceeds the bound {rss['bound']} MiB")
    if result.get("server_log_errors"):
        failures.append(f"the server logged {len(result['server_log_errors'])} error line(s), first: "
                        f"{result['server_log_errors'][0]}")
    return failures


def _log_errors(text: str) -> list[str]:
    """The server log's error lines (at most 20): cfic's own format (``<time> ERROR <logger>: ...``), uvicorn's
    (``ERROR:    Exception in ASGI application``) and tracebacks. Every 4xx/503/504 the soak provokes is logged at
    INFO at most, so any such line is a bug worth reading even when every status was allowed."""
    marks = (" ERROR ", " CRITICAL ")
    return [line for line in text.splitlines()
            if any(m in line for m in marks) or line.startswith(("ERROR:", "CRITICAL:", "Traceback"))][:20]


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _after_soak(base_url: str, proc: subprocess.Popen, timeout_s: float) -> tuple[dict, dict | None]:
    """Is the server alive after the soak? ``/healthz``, then -- once the backlog has drained (bounded) -- a real
    ``/ground`` whose evidence must be verbatim, and the server's counters. A server that no longer answers is a
    result ("error"), not a crash of the load test."""
    import httpx

    after: dict = {"healthz": None, "ground": None, "verbatim": None}
    stats = None
    try:
        with httpx.Client(base_url=base_url, timeout=timeout_s + 30) as c:
            after["healthz"] = c.get("/healthz").status_code
            drain_until = time.monotonic() + timeout_s + 30  # every queued request ends by its deadline
            while c.get("/stats").json()["queue_depth"] and time.monotonic() < drain_until:
                time.sleep(0.5)
            docs = [{"id": "after", "text": "The lighthouse of Avalon was built in 1843. It is painted red."}]
            for _ in range(5):
                answer = c.post("/ground", json={"query": "When was the lighthouse built?", "documents": docs})
                if answer.status_code != 503:
                    break
                time.sleep(min(30, int(answer.headers.get("retry-after", "1"))))
            after["ground"] = answer.status_code
            if answer.status_code == 200:
                after["verbatim"] = all(
                    ev["text"] == docs[ev["document_index"]]["text"][ev["start_char"]:ev["end_char"]]
                    for ev in answer.json().get("evidence", []))
            stats = c.get("/stats").json()
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        after["error"] = f"{type(exc).__name__}: {exc}"
    after["rss_mib"] = _proc_status(proc.pid, "VmRSS")
    return after, stats


def _rss_figures(cache_limit: int, samples: list[tuple[float, float]], after_load: float | None,
                 model: float | None, start: float | None, hwm_before: float | None, hwm_after: float | None,
                 cache_before: dict | None, cache_after: dict | None) -> dict:
    """The server's memory over the soak (MiB) and its bound: (``model`` + the cache limit) x (1 + RSS_ALLOWANCE),
    where ``model`` is the RSS after the first request minus what that request cached (the model serving one
    request; ``after_load``, before any request, is shown too). ``beyond_cache``: RSS at the end minus ``model``
    minus what the cache held at the end -- memory that neither the model nor the cache explains.
    ``cache_filled``: the cache reached its limit (it evicted), so the bound was really tested; with a cache that
    never filled the bound is loose."""
    sampled_peak = max((v for _, v in samples), default=None)
    # VmHWM is the lifetime peak: when it rose during the soak, its new value is the soak's exact peak (the
    # samples can miss a short spike); otherwise the soak stayed below the load-time peak.
    peak = sampled_peak
    if hwm_after is not None and hwm_before is not None and hwm_after > hwm_before:
        peak = max(peak or 0.0, hwm_after)
    end = samples[-1][1] if samples else None
    mib = 2**20
    info: dict = {"after_load": after_load, "model": model, "start": start, "end": end, "peak_sampled": sampled_peak,
                  "hwm_before": hwm_before, "hwm_after": hwm_after, "peak": peak, "cache_limit": cache_limit / mib}
    if samples:  # the trend: RSS at each quarter of the soak
        last = samples[-1][0] or 1.0
        info["quarters"] = [next(v for t, v in samples if t >= q * last) for q in (0.25, 0.5, 0.75, 1.0)]
    if cache_before and cache_after:
        info["cache_start"] = cache_before["bytes"] / mib
        info["cache_end"] = cache_after["bytes"] / mib
        info["cache_filled"] = cache_after["evictions"] > cache_before["evictions"]
        if end is not None and model is not None:
            info["beyond_cache"] = end - model - info["cache_end"]
    if model is not None:
        info["bound"] = (model + cache_limit / mib) * (1 + RSS_ALLOWANCE)
    rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in info.items()}
    rounded["allowance_share"] = RSS_ALLOWANCE  # a share, not MiB: never rounded to one decimal
    return rounded


def run_soak(args: argparse.Namespace) -> dict:
    import httpx

    from cfic.api.settings import parse_size

    rng = random.Random(args.seed)
    mix = _parse_mix(args.mix)
    port = _free_port()
    base_url = f"http://{HOST}:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="cfic-soak-"))
    log_path = workdir / "server.log"
    proc = _start_server(args, port, log_path)
    result: dict = {"mode": "soak",
                    "command": " ".join([Path(sys.executable).name, "-m", "cfic.api.loadtest", *sys.argv[1:]]),
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                                "server_threads": args.server_threads or os.environ.get("OMP_NUM_THREADS")},
                    "mix": mix}
    if hasattr(os, "getloadavg"):
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    try:
        result["startup_s"] = round(_wait_ready(base_url, proc, args.startup_timeout), 1)
        after_load = _proc_status(proc.pid, "VmRSS")
        pool = []
        for p in range(args.pool):
            text, questions = make_document(rng, args.doc_words, f"p{p}")
            pool.append(([{"id": f"p{p}", "text": text}], questions))
        requests = SoakRequests(rng, args.doc_words, pool)
        with httpx.Client(base_url=base_url, timeout=args.timeout + 30) as c:  # the pool enters the cache
            # "The model" of the bound is the model serving a request: the first request's working memory (torch
            # activations and workspaces, ~270 MiB on the default model in bfloat16, kept by the allocator) is no
            # leak, so RSS is measured after one request, minus what that request put in the cache.
            for i, (docs, questions) in enumerate(pool):
                c.post("/ground", json={"query": questions[0], "documents": docs}).raise_for_status()
                if i == 0:
                    rss_first = _proc_status(proc.pid, "VmRSS")
                    first_cached = c.get("/stats").json()["cache"]["bytes"] / 2**20
                    model_rss = None if rss_first is None else rss_first - first_cached
            cache_before = c.get("/stats").json()["cache"]
        start = _proc_status(proc.pid, "VmRSS")
        hwm_before = _proc_status(proc.pid, "VmHWM")
        outcomes, run_info = asyncio.run(_soak_clients(base_url, port, args, requests, mix, proc.pid, proc))
        hwm_after = _proc_status(proc.pid, "VmHWM")
        result.update(seconds=args.seconds, clients=args.clients, elapsed_s=run_info["elapsed_s"],
                      server_exited_at_s=run_info["server_exited_at_s"])
        result["requests"] = len(outcomes)
        result["kinds"] = summarise_kinds(outcomes, requests)
        totals: dict[str, int] = {}
        for o in outcomes:
            totals[o.status] = totals.get(o.status, 0) + 1
        result["status_totals"] = dict(sorted(totals.items()))
        # Allowed, but not the documented answer (e.g. a 503 or 504 for a bad input that reached the model queue).
        result["unexpected_statuses"] = {
            name: odd for name, k in result["kinds"].items()
            if (odd := {s: n for s, n in k["statuses"].items()
                        if k["expected"] and s.isdigit() and int(s) not in k["expected"]})}
        result["latency_200"] = _latency([o.latency_ms for o in outcomes if o.status == "200"
                                          and requests.kinds[o.kind][0] in ("hit", "miss")])
        samples = run_info["rss_samples"]
        result["rss_samples"] = samples
        result["after"], result["server_stats"] = _after_soak(base_url, proc, args.timeout)
        cache_after = (result["server_stats"] or {}).get("cache")
        result["rss_mib"] = _rss_figures(parse_size(args.cache_bytes), samples, after_load, model_rss, start,
                                         hwm_before, hwm_after, cache_before, cache_after)
        if hasattr(os, "getloadavg"):
            result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        _stop_server(proc)
        result["server_exit_code"] = proc.returncode
        result["server_log"] = str(log_path)
        with contextlib.suppress(OSError):
            result["server_log_errors"] = _log_errors(log_path.read_text(errors="replace"))
    if "kinds" in result:
        result["failures"] = soak_failures(result)
    return result


def soak_markdown(result: dict) -> str:
    """The soak's tables (requests and statuses per kind) and figures, ready for BENCHMARKS.md: every number the
    invariants rest on is printed, so a reader can check the verdict."""
    lines = ["| kind | group | requests | statuses | expected | p50 ms | p95 ms |", "|---" * 7 + "|"]
    for name, k in result["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in k["statuses"].items()) or "–"
        expected = "/".join(map(str, k["expected"])) or "closed, or any allowed"
        lat = k["latency_200"] if k["group"] in ("hit", "miss") else k["latency_all"]
        lines.append(f"| {name} | {k['group']} | {k['requests']} | {statuses} | {expected} | {lat['p50_ms']} | "
                     f"{lat['p95_ms']} |")
    rss, after, machine = result["rss_mib"], result["after"], result.get("machine", {})
    shares = {name: k["cached_token_share"] for name, k in result["kinds"].items() if "cached_token_share" in k}
    lines += [
        "",
        f"Machine: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores, server torch threads "
        f"{machine.get('server_threads') or 'default'}; load average before {result.get('load_average_before')}, "
        f"after {result.get('load_average_after')}; server startup {result.get('startup_s')} s.",
        f"{result['requests']} requests by {result['clients']} clients in {result['elapsed_s']} s "
        f"({result['seconds']} s of new requests, then the last ones finish); statuses: "
        + ", ".join(f"{s}: {n}" for s, n in result["status_totals"].items()) + ".",
        f"200s of hits and misses: p50 {result['latency_200']['p50_ms']} ms, "
        f"p95 {result['latency_200']['p95_ms']} ms; cached token share {shares}.",
        f"Allowed but not the documented status: {result.get('unexpected_statuses') or 'none'}.",
        f"Server RSS (MiB): after the model load {rss['after_load']}, model serving one request (RSS after the "
        f"first one minus its cache entry) {rss.get('model')}, soak start {rss['start']}, at each quarter "
        f"{rss.get('quarters')}, peak {rss['peak']} (sampled {rss['peak_sampled']}, VmHWM {rss['hwm_after']}), "
        f"end {rss['end']}; bound {rss.get('bound')} = (model + cache limit {rss['cache_limit']}) x "
        f"{1 + rss['allowance_share']:g}.",
        f"Encoding cache (MiB): {rss.get('cache_start')} at the start, {rss.get('cache_end')} at the end, filled "
        f"(evicted): {rss.get('cache_filled')}; RSS at the end beyond the model and the cache contents: "
        f"{rss.get('beyond_cache')} MiB.",
        f"After the soak: healthz {after['healthz']}, ground {after['ground']} (verbatim: {after['verbatim']})"
        + (f", error {after['error']}" if after.get("error") else "")
        + f"; server stats: {result.get('server_stats')}.",
    ]
    if result.get("server_log_errors"):
        lines.append(f"Server log error lines: {result['server_log_errors'][:3]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfic.api.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true",
                        help="soak mode: N clients for M seconds mixing cache hits, misses, oversize and malformed "
                             "requests and disconnecting clients; exit 1 when an invariant fails")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (N; default 4, soak 8)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="duration of each phase, or of the soak (M; default 60, soak 120)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="soak: relative weights of the request groups")
    parser.add_argument("--rss-interval", type=float, default=1.0, help="soak: seconds between RSS samples")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads of the server (default: inherited OMP_NUM_THREADS)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable), e.g. to try a fix; recorded in "
                             "the result")
    parser.add_argument("--phases", default="unique,repeated,overload")
    parser.add_argument("--doc-words", type=int, default=300, help="words per synthetic document")
    parser.add_argument("--docs-per-request", type=int, default=1)
    parser.add_argument("--pool", type=int, default=8,
                        help="documents in the repeated phase's pool (soak: the documents cache hits ask about)")
    parser.add_argument("--overload-clients", type=int, default=None, help="default: 2 x (max-queue + max-batch)")
    parser.add_argument("--overload-seconds", type=float, default=None, help="default: --seconds")
    parser.add_argument("--backoff", type=float, default=0.1, help="client pause after a 503 or transport error")
    parser.add_argument("--model", default=None, help="model for the server (default: the packaged one)")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="server per-request timeout")
    parser.add_argument("--cache-bytes", default=None,
                        help=f"the server's encoding-cache limit (default 1GiB, the server's; soak {SOAK_CACHE_BYTES}"
                             ", small enough that the soak fills it, so the RSS bound is a real test)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = 8 if args.soak else 4
    if args.seconds is None:
        args.seconds = 120.0 if args.soak else 60.0
    if args.cache_bytes is None:
        args.cache_bytes = SOAK_CACHE_BYTES if args.soak else "1GiB"
    try:
        from cfic.api.settings import parse_size

        parse_size(args.cache_bytes)
    except Exception as exc:  # noqa: BLE001 - CficError: say it before a server starts
        parser.error(f"--cache-bytes: {exc}")
    _parse_env(args.server_env)  # a malformed NAME=VALUE fails before the server starts
    for name in ("clients", "doc_words", "docs_per_request", "pool", "max_queue", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.server_threads is not None and args.server_threads < 1:
        parser.error("--server-threads must be >= 1")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]: the load test is bounded in time")
    if not 0.05 <= args.rss_interval <= 60:
        parser.error("--rss-interval must be in [0.05, 60]")
    if args.soak:
        _parse_mix(args.mix)  # a bad --mix fails before the server starts
        result = run_soak(args)
        print()
        print(soak_markdown(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        failures = result.get("failures", ["the soak did not run to its end"])
        for failure in failures:
            print(f"FAILED: {failure}")
        print("soak passed" if not failures else f"soak failed ({len(failures)} invariant(s))")
        sys.exit(1 if failures else 0)
    result = run(args)
    print()
    print(markdown(result))
    print()
    print(f"startup {result.get('startup_s')} s; after the run: healthz {result['after']['healthz']}, "
          f"ground {result['after']['ground']} (verbatim: {result['after']['verbatim']}); "
          f"server peak RSS (VmHWM) {result.get('server_peak_rss_mib')} MiB; server stats {result['server_stats']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result["after"]["healthz"] == 200 and result["after"]["ground"] == 200
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

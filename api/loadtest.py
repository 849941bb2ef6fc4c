"""Load test of ``cfic serve`` on the loopback interface: ``python -m cfic.api.loadtest``.

Starts its own server (``python -m cfic.api.cli``) on 127.0.0.1 and a free port -- it never targets any other
address -- then runs bounded phases of N concurrent clients for M seconds each:

- ``unique``: every request brings a document the server has never seen (every request pays the prefill);
- ``repeated``: requests ask new questions about a small pool of documents already in the encoding cache;
- ``overload``: many more clients than the queue holds, to show the 503 + Retry-After back-pressure.

It reports throughput, p50/p95 latency, the share of 503s and other errors, the share of cached document tokens and
the server's peak RSS (VmHWM), then checks that the server still answers, and stops it. Every loop is bounded in
time; the whole run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, by construction

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


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


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
    p50, p95 = _percentile(latencies, 50), _percentile(latencies, 95)
    report.p50_ms = None if p50 is None else round(p50, 1)
    report.p95_ms = None if p95 is None else round(p95, 1)
    doc_tokens = sum(s.usage["input_tokens"] for s in ok)
    cached = sum(s.usage["cached_tokens"] for s in ok)
    report.cached_token_share = round(cached / doc_tokens, 3) if doc_tokens else 0.0
    if ok:  # where the server's time went, on average
        report.mean_server_ms = {"latency_ms": round(statistics.fmean(s.usage["latency_ms"] for s in ok), 1)}
        for k in ("queue_ms", "encode_ms", "prefix_ms", "skip_ms"):
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
    env.pop("CFIC_API_KEY", None)  # the load test talks to its own unauthenticated loopback server
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfic.api.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (N)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each phase (M)")
    parser.add_argument("--phases", default="unique,repeated,overload")
    parser.add_argument("--doc-words", type=int, default=300, help="words per synthetic document")
    parser.add_argument("--docs-per-request", type=int, default=1)
    parser.add_argument("--pool", type=int, default=8, help="documents in the repeated phase's pool")
    parser.add_argument("--overload-clients", type=int, default=None, help="default: 2 x (max-queue + max-batch)")
    parser.add_argument("--overload-seconds", type=float, default=None, help="default: --seconds")
    parser.add_argument("--backoff", type=float, default=0.1, help="client pause after a 503 or transport error")
    parser.add_argument("--model", default=None, help="model for the server (default: the packaged one)")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="server per-request timeout")
    parser.add_argument("--cache-bytes", default="1GiB")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args(argv)
    for name in ("clients", "doc_words", "docs_per_request", "pool", "max_queue", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]: the load test is bounded in time")
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

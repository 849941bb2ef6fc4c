"""Corpus-index benchmark: build throughput, search latency, and recall of the approximate index vs the exact one.

    python -m cfic.retrieval.bench                      # 10k and 100k synthetic vectors + real-text embedding
    python -m cfic.retrieval.bench --sizes 10000 --skip-real --json out.json

Synthetic part: random unit vectors (dimension 384, as all-MiniLM-L6-v2), one per document, added through
``CorpusIndex.add(..., embeddings=...)`` -- the whole save path (faiss, SQLite, atomic write) without the model.
Random vectors are the hard case for HNSW (no cluster structure), so its recall here is a floor. Queries are fresh
random unit vectors; latency is one ``CorpusIndex.search`` call (faiss + SQLite lookups), k documents.

Real part: ``CorpusIndex.add`` of real text with the embedding model (sentence split, passages, MiniLM) -- the
documents/s a user sees on this machine; text-query search latency (query embedding included); and HNSW recall
against exact search on those real passage vectors, queried with the corpus's real questions when present.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_synthetic(size: int, dim: int, n_queries: int, k: int, ef_values: list[int], root: Path,
                    seed: int = 0) -> list[dict[str, Any]]:
    from cfic.retrieval.index import CorpusIndex

    rng = np.random.default_rng(seed)
    vectors = _unit(rng, size, dim)
    queries = _unit(rng, n_queries, dim)
    docs = [{"id": f"doc-{i}", "text": f"synthetic document {i}"} for i in range(size)]
    rows: list[dict[str, Any]] = []
    exact: list[set[str]] = []
    for kind in ("flat", "hnsw"):
        folder = root / f"{kind}-{size}"
        index = CorpusIndex.create(folder, kind=kind, dimension=dim)
        t0 = time.perf_counter()
        index.add(docs, embeddings=vectors)
        build_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        index.close()
        index = CorpusIndex.open(folder)  # search what a later process would load
        for ef in ef_values if kind == "hnsw" else [None]:
            index.search(queries[0], k=k, ef_search=ef)  # warm-up
            latencies: list[float] = []
            found: list[set[str]] = []
            for q in queries:
                t = time.perf_counter()
                hits = index.search(q, k=k, ef_search=ef)
                latencies.append((time.perf_counter() - t) * 1000)
                found.append({h.id for h in hits})
            if kind == "flat":
                exact = found
            recall = statistics.fmean(len(a & b) / k for a, b in zip(found, exact, strict=True))
            rows.append({
                "vectors": size, "kind": kind, "ef_search": ef, "build_s": round(build_s, 2),
                "build_docs_per_s": round(size / build_s), "search_p50_ms": round(_percentile(latencies, 0.5), 3),
                "search_p95_ms": round(_percentile(latencies, 0.95), 3), f"recall@{k}_vs_exact": round(recall, 4),
                "bytes_on_disk": disk,
            })
            print(json.dumps(rows[-1]), flush=True)
        index.close()
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _default_corpus() -> Path | None:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "eval" / "data" / "nq_long_docs.jsonl.gz",):
        if candidate.is_file():
            return candidate
    try:
        from importlib.resources import files

        path = Path(str(files("cfic.eval") / "data" / "nq_long_docs.jsonl.gz"))
        return path if path.is_file() else None
    except (ModuleNotFoundError, TypeError):
        return None


def read_corpus(path: Path, limit: int | None) -> list[str]:
    """Texts of a .txt file (paragraphs), or .jsonl/.jsonl.gz rows (``text``, or the ``text`` of ``ctxs``)."""
    if path.suffix == ".txt":
        texts = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        texts = []
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row.get("text") or "\n".join(c.get("text", "") for c in row.get("ctxs", []))
                if text.strip():
                    texts.append(text)
    return texts[:limit] if limit else texts


def _questions(corpus: Path) -> list[str]:
    """Real questions about the corpus when they sit next to it (``nq_long.jsonl.gz`` beside ``nq_long_docs``)."""
    sibling = corpus.with_name(corpus.name.replace("_docs", ""))
    if sibling == corpus or not sibling.is_file():
        return []
    opener = gzip.open if sibling.suffix == ".gz" else open
    with opener(sibling, "rt", encoding="utf-8") as fh:
        return [q for line in fh if line.strip() and (q := json.loads(line).get("question"))]


def bench_real(corpus: Path, limit: int | None, n_queries: int, k: int, ef_values: list[int],
               root: Path) -> dict[str, Any]:
    """Embed real text through ``CorpusIndex.add``; then HNSW recall on those real passage vectors."""
    from cfic.retrieval.embedder import get_embedder
    from cfic.retrieval.index import CorpusIndex, faiss_ids

    texts = read_corpus(corpus, limit)
    embedder = get_embedder()
    embedder.embed(["warm-up"])
    folder = root / "real"
    index = CorpusIndex.create(folder, embedder=embedder)
    t0 = time.perf_counter()
    report = index.add([{"id": str(i), "text": t} for i, t in enumerate(texts)])
    build_s = time.perf_counter() - t0
    words = sum(len(t.split()) for t in texts)
    questions = _questions(corpus) or [" ".join(t.split()[5:17]) for t in texts]
    questions = questions[:n_queries]
    latencies = []
    for q in questions:
        t = time.perf_counter()
        index.search(q, k=k)
        latencies.append((time.perf_counter() - t) * 1000)
    # Recall of HNSW against exact search on these real passage vectors (one vector per entry).
    ids = faiss_ids(index._faiss)
    vectors = index._faiss.reconstruct_batch(ids)
    index.close()
    query_vectors = embedder.embed(questions)
    entries = [{"id": str(int(i)), "text": "passage"} for i in ids]
    found: dict[str, list[set[str]]] = {}
    for kind in ("flat", "hnsw"):
        sub = CorpusIndex.create(root / f"real-{kind}", kind=kind, dimension=embedder.dimension)
        sub.add(entries, embeddings=vectors)
        for ef in ef_values if kind == "hnsw" else [None]:
            found[f"{kind}-{ef}"] = [{h.id for h in sub.search(q, k=k, ef_search=ef)} for q in query_vectors]
        sub.close()
    exact = found.pop("flat-None")
    recall = {key.split("-")[1]: round(statistics.fmean(len(a & b) / k for a, b in zip(got, exact, strict=True)), 4)
              for key, got in found.items()}
    shutil.rmtree(folder, ignore_errors=True)
    row = {
        "corpus": corpus.name, "documents": len(texts), "words": words, "passages": report.passages,
        "build_s": round(build_s, 2), "docs_per_s": round(len(texts) / build_s, 2),
        "passages_per_s": round(report.passages / build_s, 1), "words_per_s": round(words / build_s),
        "queries": len(questions), "text_search_p50_ms": round(_percentile(latencies, 0.5), 2),
        f"hnsw_recall@{k}_by_ef_search": recall, "embedder": embedder.name, "device": embedder.device,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfic.retrieval.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--ef-search", default="64,128,512", help="HNSW efSearch values to measure")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="real text for the embedding figure (.txt, .jsonl, .jsonl.gz); "
                             "default: the NQ long documents shipped with cfic.eval")
    parser.add_argument("--corpus-limit", type=int, default=None)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss

    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
               "faiss_threads": faiss.omp_get_max_threads(), "load_avg": os.getloadavg()}
    print(json.dumps({"machine": machine}), flush=True)
    root = Path(tempfile.mkdtemp(prefix="cfic-index-bench-"))
    results: dict[str, Any] = {"machine": machine, "synthetic": [], "real": None}
    try:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            results["synthetic"] += bench_synthetic(size, args.dim, args.queries, args.k,
                                                    [int(e) for e in args.ef_search.split(",")], root)
        if not args.skip_real:
            corpus = args.corpus or _default_corpus()
            if corpus is None:
                print("no real corpus found; pass --corpus", flush=True)
            else:
                results["real"] = bench_real(corpus, args.corpus_limit, args.queries, args.k,
                                             [int(e) for e in args.ef_search.split(",")], root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["machine"]["load_avg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    _print_table(results, args.k)


def _print_table(results: dict[str, Any], k: int) -> None:
    print(f"\n| vectors | index | efSearch | build (docs/s) | search p50 (ms) | p95 (ms) | recall@{k} vs exact |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results["synthetic"]:
        print(f"| {r['vectors']:,} | {r['kind']} | {r['ef_search'] or '-'} | {r['build_docs_per_s']:,} | "
              f"{r['search_p50_ms']} | {r['search_p95_ms']} | {r[f'recall@{k}_vs_exact']} |")
    real = results.get("real")
    if real:
        print(f"\nreal text ({real['corpus']}: {real['documents']} docs, {real['words']:,} words, "
              f"{real['passages']} passages): {real['docs_per_s']} docs/s, {real['passages_per_s']} passages/s, "
              f"{real['words_per_s']:,} words/s; text search p50 {real['text_search_p50_ms']} ms; HNSW recall@{k} "
              f"on these real passage vectors by efSearch: {real[f'hnsw_recall@{k}_by_ef_search']}")


if __name__ == "__main__":
    main()

"""Corpus-index benchmark: build throughput, search latency, and recall of the approximate index vs the exact one.

    python -m cfic.retrieval.bench                      # 10k and 100k synthetic vectors + real-text embedding
    python -m cfic.retrieval.bench --sizes 10000 --skip-real --json out.json
    python -m cfic.retrieval.bench --real --sizes 10000,100000 --json out.json   # real text at scale

Synthetic part: random unit vectors (dimension 384, as all-MiniLM-L6-v2), one per document, added through
``CorpusIndex.add(..., embeddings=...)`` -- the whole save path (faiss, SQLite, atomic write) without the model.
Random vectors are the hard case for HNSW (no cluster structure), so its recall here is a floor. Queries are fresh
random unit vectors; latency is one ``CorpusIndex.search`` call (faiss + SQLite lookups), k documents.

Real part: ``CorpusIndex.add`` of real text with the embedding model (sentence split, passages, MiniLM) -- the
documents/s a user sees on this machine; text-query search latency (query embedding included); and HNSW recall
against exact search on those real passage vectors, queried with the corpus's real questions when present.

``--real``: real text at scale, from the shared raw QA data (``--raw``; see :func:`build_real_corpus`): HotpotQA,
NQ, SQuAD and L-Eval text cut into one-passage documents (about 70 words), topped up with docstring prose of the
installed packages when more documents are asked for than that text makes (about 12k). Each size is added through
``CorpusIndex.add`` with text, as ``cfic index add`` does (embedding timed apart from faiss, SQLite and the saves),
into a flat index; the same vectors then go into an HNSW index through ``add(..., embeddings=...)``. Both are
reopened from disk and searched with real questions: latency with the query's embedding (text) and without
(vector), HNSW recall@k against the flat index's results, and how often a gold document is in the top k. The
corpus and its embeddings are kept in ``--cache`` (default in the temp folder), so a rerun does not embed again;
the embedding figures of a rerun are those the cache recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfic.eval.metrics import percentile


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


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
                "build_docs_per_s": round(size / build_s), "search_p50_ms": round(percentile(latencies, 50), 3),
                "search_p95_ms": round(percentile(latencies, 95), 3), f"recall@{k}_vs_exact": round(recall, 4),
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
    from cfic.retrieval.index import CorpusIndex

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
    ids = index._opened().vectors.ids()
    vectors = index._opened().vectors.reconstruct(ids)
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
        "queries": len(questions), "text_search_p50_ms": round(percentile(latencies, 50), 2),
        f"hnsw_recall@{k}_by_ef_search": recall, "embedder": embedder.name, "device": embedder.device,
    }
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------------ real text at scale
# ``--real --sizes 10000,100000``: that many real-text documents through ``CorpusIndex.add`` -- the path of
# ``cfic index add``: sentence split, passages, batched MiniLM embedding, faiss, SQLite, a save every
# ``--commit-every`` documents -- into a flat index; the same vectors into an HNSW index; then search latency with and
# without the query's embedding, HNSW recall against exact search, and how often a question's gold document is found.

_RAW_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"
_CACHE_DEFAULT = Path(tempfile.gettempdir()) / "cfic-index-bench-cache"
_CORPUS_VERSION = 1  # bump when documents are cut differently: cached corpora are keyed by it
_MIN_WORDS = 8  # shorter pieces (headings, table debris) are not documents anyone looks for
_MIN_FILLER_WORDS = 20  # docstring paragraphs shorter than this are mostly parameter lines
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # L-Eval's NQ pages keep Wikipedia's HTML-ish tags


@dataclass(frozen=True)
class Query:
    """A real question; ``gold``: positions of the documents holding its evidence (empty: not known)."""

    text: str
    source: str
    gold: tuple[int, ...] = ()


@dataclass
class RealCorpus:
    """Documents of exactly one index passage each, where each came from, and real questions about them."""

    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)

    def head(self, size: int) -> RealCorpus:
        """The first ``size`` documents; gold outside them is dropped (such a question then has no known gold)."""
        queries = [Query(q.text, q.source, tuple(g for g in q.gold if g < size)) for q in self.queries]
        return RealCorpus(self.texts[:size], self.sources[:size], queries)


class _Cutter:
    """Cuts text into documents that ``CorpusIndex.add`` keeps as exactly one passage each (sentences packed up to
    the passage budget, with the index's own splitter), so that a document's one vector can be handed to a second
    index as ``embeddings``; exact repeats are kept once (HotpotQA examples share paragraphs, NQ questions share
    gold passages)."""

    def __init__(self, corpus: RealCorpus, count_tokens: Callable[[Sequence[str]], list[int]], budget: int):
        self.corpus = corpus
        self._count = count_tokens
        self._budget = budget
        self._where: dict[str, int] = {}

    def pieces(self, text: str) -> list[str]:
        from cfic.retrieval.passages import split_passages

        out: list[str] = []
        todo = [" ".join(text.split())]
        while todo:
            piece = todo.pop()
            spans = split_passages(piece, self._count, self._budget)
            if len(spans) == 1:
                a, b = spans[0]
                doc = piece[a:b].strip()
                if doc == piece:
                    out.append(doc)
                elif doc:
                    todo.append(doc)  # split again on its own: it must stay one passage as a document
            else:
                todo.extend(reversed([piece[a:b].strip() for a, b in spans]))
        return out

    def add(self, text: str, source: str, min_words: int = _MIN_WORDS) -> list[int]:
        """Positions of the documents ``text`` became (those of the first occurrence, for a repeat)."""
        positions = []
        for doc in self.pieces(text):
            if len(doc.split()) < min_words:
                continue
            pos = self._where.get(doc)
            if pos is None:
                pos = self._where[doc] = len(self.corpus.texts)
                self.corpus.texts.append(doc)
                self.corpus.sources.append(source)
            positions.append(pos)
        return positions


def _containing(corpus: RealCorpus, positions: list[int], answers: Sequence[str]) -> tuple[int, ...]:
    """The documents among ``positions`` that contain an answer string (all of them if none does)."""
    hit = [p for p in positions if any(a and a in corpus.texts[p] for a in answers)]
    return tuple(hit or positions)


def _hotpot_examples(raw: Path) -> Iterator[tuple[str, list[tuple[str, str]], set[str]]]:
    """(question, [(title, paragraph)], supporting titles) from the three HotpotQA layouts in the raw data."""
    for name in ("hotpotqa-amor/dev.jsonl", "hotpotqa-meve-sample/hotpot_dev_distractor_v1.sample100.json",
                 "hipporag-samples/hotpotqa_train_sample.json"):
        path = raw / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                else json.loads(text))
        for row in rows:
            context, facts = row["context"], row["supporting_facts"]
            if isinstance(context, dict):  # HF layout
                paragraphs = list(zip(context["title"], context["sentences"], strict=True))
                titles = set(facts["title"])
            else:
                paragraphs = [(t, s) for t, s in context]
                titles = {f[0] for f in facts}
            yield row["question"], [(t, "".join(s)) for t, s in paragraphs], titles


_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def _docstring_paragraphs() -> Iterator[str]:
    """Prose paragraphs of docstrings in this interpreter's installed packages, then its standard library, in path
    order: real English, the same wherever ``make venv`` installed the same lock file. Only used to fill the
    corpus up to the size asked for once the QA text runs out. Triple-quoted strings are found with a regular
    expression rather than by parsing: parsing 350 MB of installed code takes a quarter of an hour, the expression
    seconds, and the prose filter drops the code it lets through."""
    import sysconfig

    paths = sysconfig.get_paths()
    for base in dict.fromkeys([paths["purelib"], paths["platlib"], paths["stdlib"]]):
        for path in sorted(Path(base).rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for match in _DOCSTRING.finditer(source):
                for paragraph in (match.group(1) or match.group(2) or "").split("\n\n"):
                    flat = " ".join(paragraph.split())
                    if (len(flat.split()) >= _MIN_FILLER_WORDS and ">>>" not in flat
                            and sum(c.isalpha() for c in flat) > 0.7 * len(flat.replace(" ", ""))):
                        yield flat


def build_real_corpus(raw: Path, size: int, count_tokens: Callable[[Sequence[str]], list[int]], budget: int,
                      filler: Iterable[str] | None = None) -> RealCorpus:
    """``size`` distinct documents of real text, gold-bearing QA text first.

    Order: HotpotQA paragraphs, NQ gold passages (nq-open-oracle), SQuAD paragraphs, L-Eval documents (NQ Wikipedia
    pages, Qasper papers, multi-document QA) -- each cut into one-passage documents -- then, only if still short,
    docstring prose (``filler``, default :func:`_docstring_paragraphs`). Questions: HotpotQA (gold: the supporting
    paragraphs), NQ (gold: the passage piece holding a short answer), SQuAD (gold: the piece holding the answer),
    L-Eval (no gold: used for recall against exact search only). Nothing is repeated: a corpus that cannot reach
    ``size`` distinct documents is an error.
    """
    corpus = RealCorpus()
    cut = _Cutter(corpus, count_tokens, budget)
    for question, paragraphs, titles in _hotpot_examples(raw):
        gold: set[int] = set()
        for title, paragraph in paragraphs:
            positions = cut.add(paragraph, "hotpotqa")
            if title in titles:
                gold.update(positions)
        corpus.queries.append(Query(question, "hotpotqa", tuple(sorted(gold))))
    path = raw / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                positions = [p for ctx in row["ctxs"] for p in cut.add(ctx["text"], "nq")]
                corpus.queries.append(Query(row["question"], "nq", _containing(corpus, positions, row["answers"])))
    for name in ("dev-v2.0.subset.json", "train-v2.0.subset.json"):
        path = raw / "squad2-subset" / name
        if not path.is_file():
            continue
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                positions = cut.add(paragraph["context"], "squad")
                for qa in paragraph["qas"]:
                    if not qa.get("is_impossible") and qa.get("answers"):
                        answers = [" ".join(a["text"].split()) for a in qa["answers"]]
                        corpus.queries.append(Query(qa["question"], "squad",
                                                    _containing(corpus, positions, answers)))
    for name in ("natural_question", "scientific_qa", "multidoc_qa"):
        path = raw / "leval" / f"{name}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            cut.add(_TAG.sub(" ", row["input"]), "leval")
            corpus.queries += [Query(q, "leval") for q in row.get("instructions", []) if isinstance(q, str)]
    if len(corpus.texts) < size:
        for paragraph in _docstring_paragraphs() if filler is None else filler:
            cut.add(paragraph, "docstrings", _MIN_FILLER_WORDS)
            if len(corpus.texts) >= size:
                break
    if len(corpus.texts) < size:
        raise SystemExit(f"only {len(corpus.texts):,} distinct real-text documents could be made; asked for {size:,}")
    unique: dict[str, Query] = {}
    for q in corpus.queries:  # the same question twice (the HotpotQA samples overlap) would count twice
        unique.setdefault(q.text, q)
    corpus.queries = list(unique.values())
    return corpus.head(size) if size else corpus


def _cached_corpus(cache: Path | None, raw: Path, size: int, embedder: Any, budget: int) -> RealCorpus:
    """:func:`build_real_corpus`, kept in ``cache`` (building reads and tokenises a few million words: minutes)."""
    key = hashlib.sha256(json.dumps([_CORPUS_VERSION, str(raw.resolve()), size, embedder.name, budget,
                                     sys.prefix]).encode()).hexdigest()[:16]
    path = cache / f"corpus-{key}.json.gz" if cache else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        return RealCorpus(data["texts"], data["sources"], [Query(q[0], q[1], tuple(q[2])) for q in data["queries"]])
    t0 = time.perf_counter()
    corpus = build_real_corpus(raw, size, embedder.count_tokens, budget)
    print(json.dumps({"corpus_built_s": round(time.perf_counter() - t0, 1), "documents": len(corpus.texts),
                      "by_source": dict(Counter(corpus.sources))}), flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump({"texts": corpus.texts, "sources": corpus.sources,
                       "queries": [[q.text, q.source, list(q.gold)] for q in corpus.queries]}, fh)
    return corpus


def _embedding_cache(cache: Path | None, name: str, texts: list[str]) -> Path | None:
    if cache is None:
        return None
    digest = hashlib.sha256(name.encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return cache / f"embeddings-{len(texts)}-{digest.hexdigest()[:16]}.npz"


class _TimedEmbedder:
    """An :class:`~cfic.retrieval.embedder.Embedder` that adds up the seconds spent embedding and counting tokens,
    and shows its own progress bar (rate and time left), which also reaches a log file: the index's bar only draws
    on a terminal."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.embed_s = 0.0
        self.count_s = 0.0
        self.bar: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        t0 = time.perf_counter()
        try:
            return self._inner.count_tokens(texts)
        finally:
            self.count_s += time.perf_counter() - t0

    def embed(self, texts: Sequence[str], *, progress: object | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return self._inner.embed(texts, progress=self.bar if self.bar is not None else progress)
        finally:
            self.embed_s += time.perf_counter() - t0


def _rss_mb(field_name: str = "VmRSS") -> float:
    """This process's resident memory (``VmHWM``: its peak since the last :func:`_reset_peak_rss`), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _reset_peak_rss() -> None:
    """Linux: start ``VmHWM`` again from the current RSS, so each build's peak is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20, 1)


def _pick_queries(corpus: RealCorpus, n: int, seed: int = 0) -> list[Query]:
    """A fixed random sample of ``n`` questions, those with gold in the corpus first."""
    rng = np.random.default_rng(seed)
    with_gold = [q for q in corpus.queries if q.gold]
    without = [q for q in corpus.queries if not q.gold]
    order = [with_gold[i] for i in rng.permutation(len(with_gold))]
    order += [without[i] for i in rng.permutation(len(without))]
    picked = order[:n]
    return [picked[i] for i in rng.permutation(len(picked))]  # latency runs on a prefix: mix the kinds


def _search_rows(index: Any, kind: str, queries: list[Query], query_vectors: np.ndarray, n_latency: int, k: int,
                 ef_values: list[int], exact: list[list[str]] | None) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Latency (first ``n_latency`` queries, by vector and by text), recall against ``exact`` (the flat index's
    results; None: this is the flat index) and gold hit rate, per efSearch. Also returns the last results."""
    rows = []
    found: list[list[str]] = []
    for ef in ef_values if kind == "hnsw" else [None]:
        index.search(query_vectors[0], k=k, ef_search=ef)  # warm-up
        vector_ms, found = [], []
        for i, qv in enumerate(query_vectors):
            t0 = time.perf_counter()
            hits = index.search(qv, k=k, ef_search=ef)
            if i < n_latency:
                vector_ms.append((time.perf_counter() - t0) * 1000)
            found.append([h.id for h in hits])
        text_ms = []
        for q in queries[:n_latency]:
            t0 = time.perf_counter()
            index.search(q.text, k=k, ef_search=ef)
            text_ms.append((time.perf_counter() - t0) * 1000)
        reference = found if exact is None else exact
        recall = statistics.fmean(len(set(a) & set(b)) / k for a, b in zip(found, reference, strict=True))
        gold = [(q, f) for q, f in zip(queries, found, strict=True) if q.gold]
        hit = statistics.fmean(any(f"d{g}" in f for g in q.gold) for q, f in gold) if gold else None
        rows.append({"kind": kind, "ef_search": ef,
                     "vector_search_p50_ms": round(percentile(vector_ms, 50), 2),
                     "vector_search_p95_ms": round(percentile(vector_ms, 95), 2),
                     "text_search_p50_ms": round(percentile(text_ms, 50), 2),
                     "text_search_p95_ms": round(percentile(text_ms, 95), 2),
                     f"recall@{k}_vs_exact": round(recall, 4),
                     f"gold_hit@{k}": None if hit is None else round(hit, 4), "gold_queries": len(gold),
                     "queries": len(queries)})
    return rows, found


def _build_row(common: dict[str, Any], kind: str, cached: bool, times: dict[str, float], index_s: float,
               folder: Path, peak: float) -> dict[str, Any]:
    """One build-table row: the embedding (shared by both kinds of index: the HNSW index reuses the flat index's
    vectors) plus this index's own faiss, SQLite and save time."""
    size, embed_s, split_s = common["documents"], times["embed_s"], times["split_s"]
    return {**common, "kind": kind, "embedding_cached": cached,
            "embed_s": round(embed_s, 1), "embed_passages_per_s": round(size / embed_s, 1),
            "split_s": round(split_s, 2), "index_s": round(index_s, 2), "index_docs_per_s": round(size / index_s),
            "add_docs_per_s": round(size / (embed_s + split_s + index_s), 1),
            "disk_mb": _folder_mb(folder), "peak_rss_mb": peak}


def bench_real_scale(sizes: list[int], raw: Path, n_latency: int, n_recall: int, k: int, ef_values: list[int],
                     root: Path, cache: Path | None, commit_every: int | None) -> dict[str, Any]:
    """Build, search and compare flat and HNSW indexes of real text at each size (see the module docstring)."""
    from tqdm import tqdm

    from cfic.retrieval.embedder import get_embedder
    from cfic.retrieval.index import CorpusIndex

    embedder = get_embedder()
    embedder.embed(["warm-up"])
    budget = min(128, embedder.max_tokens)  # CorpusIndex.create's default passage_tokens
    full = _cached_corpus(cache, raw, max(sizes), embedder, budget)
    build: list[dict[str, Any]] = []
    search: list[dict[str, Any]] = []
    hnsw_params: dict[str, Any] = {}
    for size in sorted(sizes):
        corpus = full.head(size)
        docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(corpus.texts)]
        queries = _pick_queries(corpus, n_recall)
        query_vectors = embedder.embed([q.text for q in queries])
        words = sum(len(t.split()) for t in corpus.texts)
        tokens = sum(embedder.count_tokens(corpus.texts))
        common = {"documents": size, "words_per_doc": round(words / size, 1), "tokens_per_doc": round(tokens / size, 1),
                  "by_source": dict(Counter(corpus.sources))}
        cache_file = _embedding_cache(cache, embedder.name, corpus.texts)
        cached = np.load(cache_file) if cache_file is not None and cache_file.is_file() else None

        timed = _TimedEmbedder(embedder)
        folders = {"flat": root / f"flat-{size}", "hnsw": root / f"hnsw-{size}"}
        flat = CorpusIndex.create(folders["flat"], embedder=timed)
        _reset_peak_rss()
        t0 = time.perf_counter()
        if cached is None:
            timed.bar = tqdm(total=size, unit="passage", desc=f"embedding {size:,}", mininterval=30, file=sys.stderr,
                             disable=False)
            report = flat.add(docs, commit_every=commit_every)
            timed.bar.close()
        else:
            report = flat.add(docs, embeddings=cached["vectors"], commit_every=commit_every)
        add_s = time.perf_counter() - t0
        peak = _rss_mb("VmHWM")
        if report.passages != size:
            raise SystemExit(f"{report.passages} passages for {size} documents: the corpus is not one passage each")
        vectors = flat._opened().vectors.reconstruct(np.arange(size, dtype=np.int64))  # vid i is document i
        if cached is None:
            embed_s, split_s = timed.embed_s, timed.count_s
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache_file, vectors=vectors, embed_s=embed_s, split_s=split_s)
        else:
            embed_s, split_s = float(cached["embed_s"]), float(cached["split_s"])
        flat.close()
        index_s = add_s - timed.embed_s - timed.count_s  # faiss, SQLite, saves (and the splitter's own Python)
        times = {"embed_s": embed_s, "split_s": split_s}
        build.append(_build_row(common, "flat", cached is not None, times, index_s, folders["flat"], peak))
        print(json.dumps(build[-1]), flush=True)

        hnsw = CorpusIndex.create(folders["hnsw"], kind="hnsw", embedder=embedder)
        hnsw_params = hnsw.manifest["hnsw"]
        _reset_peak_rss()
        t0 = time.perf_counter()
        hnsw.add(docs, embeddings=vectors, commit_every=commit_every)
        hnsw_s = time.perf_counter() - t0
        peak = _rss_mb("VmHWM")
        hnsw.close()
        build.append(_build_row(common, "hnsw", cached is not None, times, hnsw_s, folders["hnsw"], peak))
        print(json.dumps(build[-1]), flush=True)
        del vectors, cached

        exact: list[list[str]] | None = None
        for kind in ("flat", "hnsw"):
            t0 = time.perf_counter()
            index = CorpusIndex.open(folders[kind], embedder=embedder)  # what a later process loads
            open_s = time.perf_counter() - t0
            rows, found = _search_rows(index, kind, queries, query_vectors, n_latency, k, ef_values, exact)
            exact = exact or found
            for row in rows:
                search.append({"documents": size, **row, "open_s": round(open_s, 2), "rss_mb": _rss_mb()})
                print(json.dumps(search[-1]), flush=True)
            index.close()
            shutil.rmtree(folders[kind], ignore_errors=True)
    return {"build": build, "search": search, "queries": {"latency": n_latency, "recall": n_recall},
            "embedder": embedder.name, "device": embedder.device, "passage_tokens": budget,
            "hnsw": hnsw_params, "commit_every": commit_every}


def time_cli_add(corpus: RealCorpus, size: int, root: Path, commit_every: int | None) -> dict[str, Any]:
    """``cfic index add corpus.jsonl`` once, as a user runs it: wall time and the child's peak RSS."""
    import resource
    import subprocess

    path = root / f"cli-{size}.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(corpus.texts[:size]):
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    cfic = Path(sys.executable).with_name("cfic")
    command = [str(cfic), "index", "add", str(path), "--index", str(root / f"cli-index-{size}"), "--commit-every",
               str(commit_every or 0)]
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    row = {"documents": size, "command": " ".join(["cfic", *command[1:]]), "wall_s": round(wall, 1),
           "docs_per_s": round(size / wall, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
           "disk_mb": _folder_mb(root / f"cli-index-{size}")}
    print(json.dumps({"cli": row}), flush=True)
    shutil.rmtree(root / f"cli-index-{size}", ignore_errors=True)
    path.unlink()
    return row


def _print_real_tables(result: dict[str, Any], k: int) -> None:
    print("\n| documents | words/doc | index | embedding (passages/s) | embedding s | index + save s | "
          "add incl. embedding (docs/s) | disk MB | peak RSS MB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in result["build"]:
        cached = " (cached)" if r["embedding_cached"] else ""
        print(f"| {r['documents']:,} | {r['words_per_doc']} | {r['kind']} | {r['embed_passages_per_s']}{cached} | "
              f"{r['embed_s']:,} | {r['index_s']:,} | {r['add_docs_per_s']} | {r['disk_mb']:,} | "
              f"{r['peak_rss_mb']:,} |")
    print(f"\n| documents | index | efSearch | search p50 / p95 ms (vector) | search p50 / p95 ms (text query) | "
          f"recall@{k} vs exact | gold hit@{k} | open s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in result["search"]:
        print(f"| {r['documents']:,} | {r['kind']} | {r['ef_search'] or '-'} | {r['vector_search_p50_ms']} / "
              f"{r['vector_search_p95_ms']} | {r['text_search_p50_ms']} / {r['text_search_p95_ms']} | "
              f"{r[f'recall@{k}_vs_exact']} | {r[f'gold_hit@{k}']} | {r['open_s']} |")
    cli = result.get("cli")
    if cli:
        print(f"\n`{cli['command']}`: {cli['wall_s']} s for {cli['documents']:,} documents "
              f"({cli['docs_per_s']} docs/s end to end, model load included), peak RSS {cli['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfic.retrieval.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated vector counts (synthetic) or document counts (--real)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200, help="queries timed (and, synthetic, all queries)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--ef-search", default="64,128,512", help="HNSW efSearch values to measure")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="real text for the embedding figure (.txt, .jsonl, .jsonl.gz); "
                             "default: the NQ long documents shipped with cfic.eval")
    parser.add_argument("--corpus-limit", type=int, default=None)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--real", action="store_true",
                        help="real-text documents through CorpusIndex.add (the cfic index add path) at --sizes, "
                             "flat vs HNSW, instead of the synthetic and small real-text parts")
    parser.add_argument("--raw", type=Path, default=_RAW_DEFAULT, help="--real: the shared raw data folder")
    parser.add_argument("--recall-queries", type=int, default=1000,
                        help="--real: questions for recall against exact search and gold hit rate")
    parser.add_argument("--cache", type=Path, default=_CACHE_DEFAULT,
                        help="--real: corpus and embeddings kept here, so a rerun does not embed again")
    parser.add_argument("--no-cache", action="store_true", help="--real: embed again (and cache nothing)")
    parser.add_argument("--commit-every", type=int, default=None,
                        help="--real: documents per save, as cfic index add --commit-every (default: its default)")
    parser.add_argument("--cli-size", type=int, default=0,
                        help="--real: also time `cfic index add` once on this many of the documents")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss

    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
               "faiss_threads": faiss.omp_get_max_threads(), "load_avg": os.getloadavg()}
    print(json.dumps({"machine": machine}), flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ef_values = [int(e) for e in args.ef_search.split(",")]
    root = Path(tempfile.mkdtemp(prefix="cfic-index-bench-"))
    if args.real:
        import torch

        from cfic.retrieval.cli import COMMIT_EVERY

        machine["torch_threads"] = torch.get_num_threads()
        commit_every = COMMIT_EVERY if args.commit_every is None else args.commit_every
        cache = None if args.no_cache else args.cache
        try:
            result = bench_real_scale(sizes, args.raw, args.queries, args.recall_queries, args.k, ef_values, root,
                                      cache, commit_every or None)
            if args.cli_size:
                from cfic.retrieval.embedder import get_embedder

                embedder = get_embedder()
                corpus = _cached_corpus(cache, args.raw, max(sizes), embedder, min(128, embedder.max_tokens))
                result["cli"] = time_cli_add(corpus, args.cli_size, root, commit_every or None)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        machine["load_avg_after"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "real": result}, indent=2))
        _print_real_tables(result, args.k)
        return
    results: dict[str, Any] = {"machine": machine, "synthetic": [], "real": None}
    try:
        for size in sizes:
            results["synthetic"] += bench_synthetic(size, args.dim, args.queries, args.k, ef_values, root)
        if not args.skip_real:
            corpus_path = args.corpus or _default_corpus()
            if corpus_path is None:
                print("no real corpus found; pass --corpus", flush=True)
            else:
                results["real"] = bench_real(corpus_path, args.corpus_limit, args.queries, args.k, ef_values, root)
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

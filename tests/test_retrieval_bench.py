"""``python -m cfic.retrieval.bench --real`` on a tiny raw-data folder: how documents are cut, the gold they keep,
and one end-to-end run (real MiniLM, real faiss; a few dozen documents)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cfic.retrieval import bench
from cfic.retrieval.embedder import get_embedder
from cfic.retrieval.passages import split_passages

TOWNS = ["Arlo", "Brenn", "Caddis", "Dunmere", "Elsby", "Fenwick", "Garrow", "Hollin", "Iverly", "Jessop"]


def _paragraph(town: str, i: int) -> str:
    return (f"{town} is a market town on the river {town[::-1].title()} with {1000 + 37 * i} inhabitants. "
            f"Its old stone bridge was built in {1500 + 11 * i} by the monks of the abbey.")


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """One file of each layout the bench reads, in miniature."""
    root = tmp_path / "raw"
    (root / "hotpotqa-amor").mkdir(parents=True)
    rows = []
    for e in range(2):
        towns = TOWNS[5 * e: 5 * e + 5]
        context = [[t, [s + " " for s in _paragraph(t, i).split(". ")]] for i, t in enumerate(towns)]
        rows.append({"question": f"When was the bridge of {towns[0]} built?", "context": context,
                     "supporting_facts": [[towns[0], [1], [], {}]]})
    (root / "hotpotqa-amor" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "lost-in-the-middle").mkdir()
    with gzip.open(root / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz", "wt") as fh:
        for i, name in enumerate(["copper", "tin", "zinc", "lead"]):
            text = (f"The {name} mine of the valley opened in {1800 + i} and closed after the great flood. "
                    f"Miners there were paid in tokens stamped with a {name} hammer.")
            fh.write(json.dumps({"question": f"when did the {name} mine open", "answers": [str(1800 + i)],
                                 "ctxs": [{"title": name, "text": text}]}) + "\n")
    (root / "squad2-subset").mkdir()
    paragraphs = [{"context": "Glass was first blown in the coastal workshops around the harbour in the year 912. "
                              "The workshops later moved inland because of fires.",
                   "qas": [{"question": "When was glass first blown?", "is_impossible": False,
                            "answers": [{"text": "912", "answer_start": 0}]},
                           {"question": "Who painted the harbour?", "is_impossible": True, "answers": []}]}]
    (root / "squad2-subset" / "dev-v2.0.subset.json").write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    (root / "leval").mkdir()
    long_doc = "<H1> Weather </H1> <P> " + " ".join(
        f"On day {d} of the survey the wind came from the {['north', 'south', 'east', 'west'][d % 4]} and the "
        f"rain gauge read {d} millimetres." for d in range(40)) + " </P>"
    (root / "leval" / "natural_question.jsonl").write_text(
        json.dumps({"input": long_doc, "instructions": ["how windy was the survey"], "outputs": ["x"]}))
    return root


def _filler(n: int) -> list[str]:
    return [f"Filler paragraph number {i} explains that the configuration value must be a positive integer and "
            f"that option {i} is ignored when the cache is disabled." for i in range(n)]


def test_documents_are_distinct_single_passages_with_gold_where_the_answers_are(raw):
    embedder = get_embedder()
    full = bench.build_real_corpus(raw, 0, embedder.count_tokens, 128, filler=[])
    assert len(full.texts) == len(set(full.texts)) > 15
    assert all(len(split_passages(t, embedder.count_tokens, 128)) == 1 for t in full.texts)
    assert all("<" not in t for t in full.texts)  # L-Eval's tags are gone
    assert full.sources.index("leval") > max(i for i, s in enumerate(full.sources) if s != "leval")
    gold = {q.text: q for q in full.queries}
    assert len(gold) == len(full.queries)
    assert "Who painted the harbour?" not in gold  # unanswerable SQuAD questions are no queries
    for question, needle in (("When was the bridge of Arlo built?", "Arlo is"), ("when did the zinc mine open", "1802"),
                             ("When was glass first blown?", "912")):
        assert gold[question].gold and all(needle in full.texts[g] for g in gold[question].gold)
    assert gold["how windy was the survey"].gold == ()

    with pytest.raises(SystemExit, match="distinct"):
        bench.build_real_corpus(raw, len(full.texts) + 5, embedder.count_tokens, 128, filler=[])
    topped = bench.build_real_corpus(raw, len(full.texts) + 5, embedder.count_tokens, 128, filler=_filler(50))
    assert topped.texts[: len(full.texts)] == full.texts
    assert topped.sources[len(full.texts):] == ["docstrings"] * 5

    head = full.head(3)
    assert len(head.texts) == 3 and all(g < 3 for q in head.queries for g in q.gold)


def test_long_text_is_cut_at_the_passage_budget_without_losing_words(raw):
    embedder = get_embedder()
    corpus = bench.RealCorpus()
    cut = bench._Cutter(corpus, embedder.count_tokens, 24)
    text = " ".join(_filler(6))
    pieces = cut.pieces(text)
    assert len(pieces) >= 6 and " ".join(pieces).split() == text.split()
    assert all(len(split_passages(p, embedder.count_tokens, 24)) == 1 for p in pieces)
    positions = cut.add(text, "x", 0)
    assert [corpus.texts[p] for p in positions] == pieces
    assert len(corpus.texts) == len(set(pieces))  # repeated pieces are kept once
    assert cut.add(text, "x", 0) == positions  # a repeat maps to the first occurrence
    assert len(corpus.texts) == len(set(pieces))


def test_real_mode_end_to_end_and_the_embedding_cache(raw, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_docstring_paragraphs", lambda: iter(_filler(40)))
    args = ["--real", "--sizes", "12,30", "--raw", str(raw), "--queries", "3", "--recall-queries", "6", "-k", "3",
            "--ef-search", "4,16", "--cache", str(tmp_path / "cache"), "--commit-every", "7",
            "--json", str(tmp_path / "out.json")]
    bench.main(args)
    result = json.loads((tmp_path / "out.json").read_text())["real"]
    assert [(r["documents"], r["kind"]) for r in result["build"]] == [(12, "flat"), (12, "hnsw"), (30, "flat"),
                                                                       (30, "hnsw")]
    assert not any(r["embedding_cached"] for r in result["build"])
    assert result["build"][2]["by_source"]["docstrings"] > 0
    rows = result["search"]
    assert [(r["documents"], r["kind"], r["ef_search"]) for r in rows] == [
        (12, "flat", None), (12, "hnsw", 4), (12, "hnsw", 16), (30, "flat", None), (30, "hnsw", 4), (30, "hnsw", 16)]
    assert all(r["recall@3_vs_exact"] == 1.0 for r in rows if r["kind"] == "flat" or r["ef_search"] == 16)
    assert all(r["gold_queries"] > 0 and 0.0 <= r["gold_hit@3"] <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert "| 30 | hnsw | 16 |" in out and "recall@3 vs exact" in out
    cached = sorted((tmp_path / "cache").glob("embeddings-*.npz"))
    assert len(cached) == 2 and np.load(cached[0])["vectors"].shape[1] == 384

    bench.main(args)  # again: nothing is embedded, the cached vectors go in through add(embeddings=...)
    again = json.loads((tmp_path / "out.json").read_text())["real"]
    assert all(r["embedding_cached"] for r in again["build"])
    assert [r["embed_s"] for r in again["build"]] == [r["embed_s"] for r in result["build"]]

"""Metrics of cfic.eval on handmade spans: answer matching, verbatim checks, sentence P/R/F1, aggregation."""

from __future__ import annotations

import logging

import pytest

from cfic.eval.metrics import (
    Span,
    aggregate,
    contains_answer,
    is_verbatim,
    locate,
    normalize_answer,
    score_example,
    select_units,
    sentence_prf,
)
from cfic.text import split_sentences

DOC = ("Title: Paris\nParis is the capital of France. It has 2,100,000 inhabitants. "
       "The Seine flows through it.\n\nTitle: Rome\nRome is the capital of Italy. It was founded in 753 BC.")


def units_of(doc: str) -> list[tuple[int, int, int]]:
    return [(0, s.start, s.end) for s in split_sentences(doc)]


def span_of(doc: str, text: str) -> tuple[int, int, int]:
    start = doc.index(text)
    return (0, start, start + len(text))


def test_normalisation_and_token_boundaries():
    assert normalize_answer("The  Eagles, (won)!") == "eagles won"
    assert contains_answer("It aired on April 25, 2018.", ["April 25 , 2018"])
    assert contains_answer("Eminem's upbringing", ["Eminem"])
    assert not contains_answer("about 100 people", ["10"])
    assert contains_answer("about 10 people", ["10"])
    assert not contains_answer("anything", ["", "  "])


def test_verbatim_and_locate():
    found = locate("Rome is the capital of Italy.", [DOC])
    assert found.located and is_verbatim(found, [DOC])
    assert DOC[found.start:found.end] == found.text
    missing = locate("Rome is Italy's capital.", [DOC])
    assert not missing.located and not is_verbatim(missing, [DOC])
    assert not is_verbatim(Span(0, 0, 5, "Paris"), [DOC])  # offsets point at "Title"
    assert not is_verbatim(Span(3, 0, 5, "Title"), [DOC])  # no such document


def test_sentence_prf_exact_partial_and_empty():
    units = units_of(DOC)
    gold = [span_of(DOC, "Paris is the capital of France."), span_of(DOC, "The Seine flows through it.")]
    assert sentence_prf(units, gold, gold) == pytest.approx((1.0, 1.0, 1.0))
    p, r, f = sentence_prf(units, gold, [gold[0], span_of(DOC, "Rome is the capital of Italy.")])
    assert (p, r) == pytest.approx((0.5, 0.5)) and f == pytest.approx(0.5)
    assert sentence_prf(units, gold, []) == (0.0, 0.0, 0.0)
    assert sentence_prf(units, [], gold) is None


def test_character_overlap_is_robust_to_different_splitting():
    units = units_of(DOC)
    gold = [span_of(DOC, "Paris is the capital of France."), span_of(DOC, "It has 2,100,000 inhabitants.")]
    # One evidence span covering both gold sentences (a coarser splitter) earns full credit.
    merged = span_of(DOC, "Paris is the capital of France. It has 2,100,000 inhabitants.")
    assert sentence_prf(units, gold, [merged]) == pytest.approx((1.0, 1.0, 1.0))
    # A short fragment selects the sentence it lies in; a fragment touching a sentence's edge does not.
    assert select_units(units, [span_of(DOC, "2,100,000")]) == {units.index(gold[1])}
    crossing = (0, gold[0][2] - 3, gold[1][2])  # last 3 chars of sentence 1 + all of sentence 2
    assert select_units(units, [crossing]) == {units.index(gold[1])}


def test_score_example_counts_paraphrase_for_recall_not_sentences():
    units = units_of(DOC)
    gold = [span_of(DOC, "It was founded in 753 BC.")]
    para = Span(-1, -1, -1, "Rome was founded in 753 BC.")
    score = score_example(example_id="x", documents=[DOC], answers=["753 BC"], answerable=True, gold=gold,
                          units=units, spans=[para], no_evidence=False, evidence_tokens=9, document_tokens=60,
                          latency_ms=1.0)
    assert score.answer_hit is True
    assert score.verbatim is False
    assert (score.precision, score.recall, score.f1) == (0.0, 0.0, 0.0)
    exact = locate("It was founded in 753 BC.", [DOC])
    score = score_example(example_id="x", documents=[DOC], answers=["753 BC"], answerable=True, gold=gold,
                          units=units, spans=[exact], no_evidence=False, evidence_tokens=9, document_tokens=60,
                          latency_ms=1.0)
    assert score.verbatim is True and score.f1 == pytest.approx(1.0) and score.evidence_sentences == 1


def test_unanswerable_examples_are_left_out_of_recall():
    score = score_example(example_id="u", documents=[DOC], answers=[], answerable=False, gold=[],
                          units=units_of(DOC), spans=[], no_evidence=True, evidence_tokens=0, document_tokens=60,
                          latency_ms=2.0)
    assert score.answer_hit is None and score.f1 is None and score.verbatim is None and score.no_evidence


def test_aggregate_rates_compression_and_percentiles():
    units = units_of(DOC)
    gold = [span_of(DOC, "It was founded in 753 BC.")]
    good = locate("It was founded in 753 BC.", [DOC])
    bad = locate("The Seine flows through it.", [DOC])
    common = dict(documents=[DOC], answers=["753 BC"], gold=gold, units=units, document_tokens=60)
    scores = [
        score_example(example_id="a", answerable=True, spans=[good], no_evidence=False, evidence_tokens=10,
                      latency_ms=10.0, stages={"prefix_ms": 4.0}, **common),
        score_example(example_id="b", answerable=True, spans=[bad], no_evidence=False, evidence_tokens=20,
                      latency_ms=30.0, stages={"prefix_ms": 8.0}, **common),
        score_example(example_id="c", answerable=False, spans=[], no_evidence=True, evidence_tokens=0,
                      latency_ms=20.0, **common),
    ]
    row = aggregate(scores, with_no_evidence=True)
    assert row["n"] == 3
    assert row["answer_recall"] == pytest.approx(0.5)
    assert row["sentence_f1"] == pytest.approx(0.5)
    assert row["evidence_tokens"] == pytest.approx(10.0)
    assert row["compression"] == pytest.approx(6.0)
    assert row["verbatim_rate"] == pytest.approx(1.0)
    assert row["no_evidence_accuracy"] == pytest.approx(1.0)
    assert row["latency_ms_p50"] == pytest.approx(20.0)
    assert row["prefix_ms_p50"] == pytest.approx(6.0)
    assert "no_evidence_accuracy" not in aggregate(scores, with_no_evidence=False)


def test_verbatim_rates_per_example_and_per_piece():
    units = units_of(DOC)
    good = locate("It was founded in 753 BC.", [DOC])
    para = Span(-1, -1, -1, "Rome was founded long ago.")
    common = dict(documents=[DOC], answers=["753 BC"], answerable=True, gold=[], units=units,
                  no_evidence=False, evidence_tokens=5, document_tokens=60, latency_ms=1.0)
    scores = [score_example(example_id="a", spans=[good, para], keep_text=True, **common),
              score_example(example_id="b", spans=[good], **common)]
    assert scores[0].evidence == [good.text, para.text] and scores[1].evidence is None
    row = aggregate(scores, with_no_evidence=False)
    assert row["verbatim_rate"] == pytest.approx(0.5)
    assert row["verbatim_piece_rate"] == pytest.approx(2 / 3, abs=1e-4)  # rows are rounded to 4 places


def test_bm25_builds_without_debug_chatter(caplog):
    from cfic.retrieval.bm25 import BM25

    with caplog.at_level(logging.DEBUG):
        BM25(["The castle stands on a hill.", "The river runs below it."]).rank(["castle"], 1)
    assert not [r for r in caplog.records if r.name.startswith("bm25s") and r.levelno < logging.WARNING]

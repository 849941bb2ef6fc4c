"""The public API on the tiny model: offsets, ranking, caching, batching, windows and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfic import CficError, Document, GroundingConfig
from cfic.decoding.encode import window_bounds
from cfic.errors import EmptyDocumentError, EmptyQueryError, QueryTooLongError
from cfic.grounder import Grounder

DOCS = [
    "Paris is the capital of France. It lies on the Seine. The Louvre is a museum in Paris.",
    "Berlin is the capital of Germany.\nIt has many museums. The Spree flows through Berlin.",
    "Tokyo is the capital of Japan. 東京は日本の首都です。 Sushi 🍣 is popular there.",
]


def assert_verbatim(result, texts):
    for ev in result.evidence:
        assert ev.text == texts[ev.document_index][ev.start_char:ev.end_char]
        assert ev.sentence_start < ev.sentence_end
        assert 0.0 <= ev.score <= 1.0


def test_ground_returns_verbatim_ranked_spans(tiny_grounder):
    r = tiny_grounder.ground("What is the capital of France?", DOCS, top_k=3)
    assert 1 <= len(r.evidence) <= 3
    assert_verbatim(r, DOCS)
    scores = [e.score for e in r.evidence]
    assert scores == sorted(scores, reverse=True)
    assert r.no_evidence is False
    assert r.usage.input_tokens > 0 and r.usage.cached_tokens == 0
    d = r.to_dict()
    assert set(d) == {"query", "model", "evidence", "no_evidence", "no_evidence_probability", "usage"}
    assert d["no_evidence_probability"] is None  # no abstention model configured


def test_spans_in_one_document_never_overlap(tiny_grounder):
    r = tiny_grounder.ground("museum", DOCS, top_k=10)
    by_doc = {}
    for e in r.evidence:
        by_doc.setdefault(e.document_index, []).append((e.sentence_start, e.sentence_end))
    assert max((len(spans) for spans in by_doc.values()), default=0) >= 2  # otherwise there is nothing to check
    for spans in by_doc.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_cached_and_uncached_encodings_give_the_same_evidence(tiny_grounder):
    g = tiny_grounder
    query = "Which river flows through Berlin?"
    plain = g.ground(query, DOCS)
    encodings = g.encode(DOCS)
    before = [w.kv.keys[0].clone() for e in encodings for w in e.windows]
    cached = g.ground(query, encodings)
    other = g.ground("Something else entirely?", encodings)
    again = g.ground(query, encodings)
    assert plain.evidence  # otherwise the comparisons below agree vacuously
    assert [e.to_dict() | {"score": 0} for e in plain.evidence] == [e.to_dict() | {"score": 0} for e in cached.evidence]
    assert [e.score for e in plain.evidence] == pytest.approx([e.score for e in cached.evidence], rel=1e-4)
    assert [e.to_dict() for e in again.evidence] == [e.to_dict() for e in cached.evidence]
    # the other question on the same encodings got its own evidence, the same as from the raw documents
    fresh_other = g.ground("Something else entirely?", DOCS)
    assert [(e.document_index, e.start_char, e.end_char) for e in other.evidence] == \
        [(e.document_index, e.start_char, e.end_char) for e in fresh_other.evidence]
    assert cached.usage.cached_tokens == sum(e.n_tokens for e in encodings)
    after = [w.kv.keys[0] for e in encodings for w in e.windows]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # encodings are never mutated


def test_batched_encoding_equals_one_by_one(tiny_loaded):
    batched = Grounder(tiny_loaded, GroundingConfig(encode_batch_tokens=100_000)).encode(DOCS)
    single = Grounder(tiny_loaded, GroundingConfig(encode_batch_tokens=1)).encode(DOCS)
    for a, b in zip(batched, single, strict=True):
        for wa, wb in zip(a.windows, b.windows, strict=True):
            assert wa.kv.length == wb.kv.length
            for ka, kb in zip(wa.kv.keys, wb.kv.keys, strict=True):
                torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)


def test_ground_batch_matches_single_queries(tiny_grounder):
    queries = ["capital of Japan?", "Where is the Louvre?"]
    batch = tiny_grounder.ground_batch(queries, DOCS)
    for q, res in zip(queries, batch, strict=True):
        single = tiny_grounder.ground(q, DOCS)
        assert single.evidence  # an empty pair would agree vacuously
        assert [(e.document_index, e.start_char, e.end_char) for e in res.evidence] == \
               [(e.document_index, e.start_char, e.end_char) for e in single.evidence]


def test_threshold_gives_no_evidence(tiny_grounder):
    r = tiny_grounder.ground("capital?", DOCS, threshold=1.0)
    assert r.no_evidence is True and r.evidence == []
    r = tiny_grounder.ground("capital?", DOCS, threshold=0.0)
    assert r.no_evidence is False


def test_document_forms_and_ids(tiny_grounder):
    docs = [{"id": "a", "text": DOCS[0], "metadata": {"k": 1}}, Document(DOCS[1], "b"), DOCS[2]]
    encodings = tiny_grounder.encode(docs)
    assert [e.document_id for e in encodings] == ["a", "b", "2"]  # a plain string gets its position
    assert encodings[0].metadata == {"k": 1} and [e.text for e in encodings] == DOCS
    r = tiny_grounder.ground("capital", docs, top_k=5)
    assert r.evidence
    assert all(e.document_id == ["a", "b", "2"][e.document_index] for e in r.evidence)


@pytest.mark.parametrize(
    ("query", "docs", "error"),
    [
        ("q", ["  \n\t "], EmptyDocumentError),
        ("q", [""], EmptyDocumentError),
        ("   ", DOCS, EmptyQueryError),
        ("q " * 400, DOCS, QueryTooLongError),
        ("q", [], CficError),
        ("q", "a bare string", CficError),
        ("q", [123], CficError),
        ("q", [{"txt": "x"}], CficError),
        ("q", [{"text": "x", "metadata": []}], CficError),
    ],
)
def test_bad_input_raises_value_errors(tiny_grounder, query, docs, error):
    with pytest.raises(error) as info:
        tiny_grounder.ground(query, docs)
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_bad_options_raise(tiny_grounder):
    with pytest.raises(CficError):
        tiny_grounder.ground("q", DOCS, top_k=0)
    with pytest.raises(CficError):
        GroundingConfig(threshold=2.0)
    with pytest.raises(CficError):
        GroundingConfig().with_options(nonsense=1)


# ---------------------------------------------------------------- long documents


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=60), st.integers(30, 120), st.integers(0, 40))
def test_window_bounds_cover_and_overlap(lengths, capacity, overlap):
    windows = window_bounds(lengths, capacity, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == len(lengths)
    for (a, b), (c, _d) in zip(windows, windows[1:], strict=False):
        assert a < c <= b  # progress, and no gap between windows
    for a, b in windows:
        assert sum(lengths[a:b]) <= capacity
    # every run of sentences with at most `overlap` tokens lies whole inside one window
    if overlap <= capacity // 2:
        for i in range(len(lengths)):
            for j in range(i + 1, len(lengths) + 1):
                if sum(lengths[i:j]) <= overlap:
                    assert any(a <= i and j <= b for a, b in windows), (i, j)


def test_long_document_is_windowed_and_offsets_hold(tiny_loaded):
    g = Grounder(tiny_loaded, GroundingConfig(max_context_tokens=900, max_span_tokens=64, max_sentence_tokens=48,
                                             max_query_tokens=32))
    text = "\n".join(f"Fact number {i} is that the item {i} weighs {i * 7} grams. It is {i % 5} metres long."
                     for i in range(120))
    enc = g.encode([text])[0]
    assert len(enc.windows) > 2
    assert enc.windows[0].first == 0 and enc.windows[-1].last == len(enc.sentences)
    for w in enc.windows:
        assert w.kv.length <= 900
    r = g.ground("How much does item 77 weigh?", [enc], top_k=5)
    assert r.evidence
    assert_verbatim(r, [text])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=200)
       .filter(lambda t: t.strip()))
def test_offset_invariant_on_arbitrary_unicode(tiny_grounder, text):
    r = tiny_grounder.ground("what?", [text, "Fixed second document. With two sentences."], top_k=3)
    assert r.evidence
    assert_verbatim(r, [text, "Fixed second document. With two sentences."])


def test_plan_then_read_is_encode(tiny_grounder):
    """``encode`` in two halves: planning reads nothing with the LM; reading the plans gives the same encodings."""
    from cfic.decoding.encode import DocumentPlan

    plans = tiny_grounder.plan(DOCS)
    assert all(isinstance(p, DocumentPlan) for p in plans)
    read, whole = tiny_grounder.read(plans), tiny_grounder.encode(DOCS)
    for a, b in zip(read, whole, strict=True):
        assert (a.document_id, a.sentences, a.answer_ids) == (b.document_id, b.sentences, b.answer_ids)
        for wa, wb in zip(a.windows, b.windows, strict=True):
            torch.testing.assert_close(wa.kv.keys[0], wb.kv.keys[0])
    assert tiny_grounder.read(read) == read  # encodings pass through

"""The sentence prior inside the constrained prefix search, its signals, abstention and their fitting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_core_decoding import DOC, QUERY, encoded, hf_logprobs, identifying_depth, window_prompt

from cfic import GroundingConfig
from cfic.decoding.encode import encode_question
from cfic.decoding.prefix import SearchPrior, constrained_prefix_search, rank
from cfic.decoding.skip import SpanSearch, candidates, skip_decode_span_end
from cfic.errors import ModelLoadError
from cfic.grounder import Grounder
from cfic.models import adapter_settings
from cfic.prior import Abstention, PriorWeights, SentencePrior, paragraph_bounds
from cfic.training.fit_prior import fit_logistic, fit_signal_weights, top_hit

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def prior_grounder(tiny_loaded):
    return Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 1.0)))


@pytest.fixture(scope="module")
def setup(prior_grounder):
    return encoded(prior_grounder)


def search(g, window, q_ids, prior, top_k=64):
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=4096)
        return constrained_prefix_search(g.runner, cache, first, window.trie, top_k, 64, None, prior)


def test_exhaustive_search_ranks_by_lm_weight_times_brute_force_score_plus_log_prior_mass(setup):
    g, enc, window, q_ids = setup
    n = len(enc.sentences)
    log_prior = torch.log_softmax(torch.randn(n, generator=torch.Generator().manual_seed(3)) * 3, dim=0)
    prior = SearchPrior(log_prior, lm_weight=0.7)
    found = search(g, window, q_ids, prior)
    prompt = window_prompt(g, enc, window) + q_ids
    expected = {}
    for p in found:
        s = p.sentences[0]
        ids = list(enc.answer_ids[s])
        d = identifying_depth(window.trie, ids)
        lp = hf_logprobs(g.loaded.model, prompt + ids[:d])
        avg = sum(float(lp[len(prompt) - 1 + i, ids[i]]) for i in range(d)) / d
        mass = float(torch.logsumexp(log_prior[list(p.sentences)], dim=0))
        assert p.prior == pytest.approx(mass, abs=1e-5)
        expected[p.sentences] = 0.7 * avg + mass
        assert rank(p, prior) == pytest.approx(expected[p.sentences], abs=2e-4)
    ranks = [rank(p, prior) for p in found]
    assert ranks == sorted(ranks, reverse=True)
    assert found[0].sentences == max(expected, key=expected.get)


@pytest.mark.parametrize("target", [0, 4, 7])
def test_a_peaked_prior_decides_when_the_lm_weight_is_zero(setup, target):
    g, enc, window, q_ids = setup
    logits = torch.zeros(len(enc.sentences))
    logits[target] = 50.0
    found = search(g, window, q_ids, SearchPrior(torch.log_softmax(logits, 0), lm_weight=0.0), top_k=3)
    assert target in found[0].sentences


def test_with_lm_weight_zero_the_search_feeds_nothing_and_the_spans_are_those_of_the_fed_search(setup):
    """The LM-free walk must pick the same starts as the search that feeds every step (its log-probabilities
    weigh 0), and skip decoding, teacher-forcing the unfed prefix itself, must end the spans in the same places."""
    g, enc, window, q_ids = setup
    n = len(enc.sentences)
    log_prior = torch.log_softmax(torch.randn(n, generator=torch.Generator().manual_seed(5)) * 2, dim=0)
    prior = SearchPrior(log_prior, lm_weight=0.0)
    ends = {}
    for fed in (True, False):
        with torch.inference_mode():
            cache, first = encode_question(g.runner, window, q_ids, room=4096)
            shared = cache.length
            found = constrained_prefix_search(g.runner, cache, first, window.trie, 3, 64, None, prior, lm_steps=fed)
            assert (cache.length > shared) == fed  # the LM-free walk runs no forward pass
            assert all((len(p.positions) == len(p.tokens) - 1) if fed else not p.positions for p in found)
            starts = candidates(found)
            spans = skip_decode_span_end(g.runner, cache, starts, SpanSearch(
                enc.answer_ids, enc.segment_ids, window.last, g.config.max_span_tokens, g.template.eos_ids, shared))
        ends[fed] = ([(p.tokens, p.sentences) for p in found], spans)
    assert ends[True][0] == ends[False][0]
    for a, b in zip(ends[True][1], ends[False][1], strict=True):
        assert (a.start, a.end) == (b.start, b.end)
        assert a.end_probabilities == pytest.approx(b.end_probabilities, abs=1e-4)
    with pytest.raises(ValueError, match="prior"):
        constrained_prefix_search(g.runner, cache, first, window.trie, 3, 64, None, None, lm_steps=False)


def test_without_a_prior_the_search_is_the_pure_lm_search(setup, tiny_grounder):
    g, enc, window, q_ids = setup
    plain = search(g, window, q_ids, None, top_k=3)
    assert all(p.prior == 0.0 for p in plain)
    assert [p.score for p in plain] == sorted((p.score for p in plain), reverse=True)


def test_paragraph_bounds_and_signals():
    text = "Title: Rivers\nThe Nile flows north.\n\n  \n\nTitle: Cakes\nFlour and eggs make a cake. Bake it."
    bounds = paragraph_bounds(text)
    assert [text[a:b].strip().split("\n")[0] for a, b in bounds] == ["Title: Rivers", "Title: Cakes"]
    from cfic.text import split_sentences

    sentences = split_sentences(text)
    prior = SentencePrior()
    feats = prior.features(text, sentences)
    assert feats.sentence_vectors.shape == (len(sentences), prior.embedder.dimension)
    assert feats.paragraph_of.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(np.linalg.norm(feats.paragraph_vectors, axis=1), 1.0, atol=1e-5)
    query = "Which direction does the Nile flow?"
    sig = SentencePrior.signals(query, prior.query_vector(query), feats)
    assert sig.shape == (len(sentences), 4)
    assert int(np.argmax(sig[:, 0])) == 1  # the sentence about the Nile
    assert sig[0, 1] == sig[1, 1] > sig[3, 1]  # paragraph cosine is shared within a paragraph
    assert sig[:, 2].max() == pytest.approx(1.0) and sig[1, 2] == pytest.approx(1.0)
    logp = SentencePrior.log_prior(sig, PriorWeights(10.0, 5.0, 1.0))
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-5) and int(np.argmax(logp)) == 1


def test_grounder_abstains_when_the_model_says_so_and_not_otherwise(tiny_loaded, setup, tiny_grounder):
    g, enc, _, _ = setup
    always = Grounder(tiny_loaded, g.config.with_options(abstention=Abstention((0.0, 0.0, 0.0, 0.0), 50.0)),
                      sentence_prior=g.sentence_prior)
    never = Grounder(tiny_loaded, g.config.with_options(abstention=Abstention((0.0, 0.0, 0.0, 0.0), -50.0)),
                     sentence_prior=g.sentence_prior)
    r = always.ground(QUERY, [DOC])
    assert r.no_evidence and r.evidence == [] and r.no_evidence_probability == pytest.approx(1.0)
    r = never.ground(QUERY, [DOC])
    assert not r.no_evidence and r.evidence and r.no_evidence_probability == pytest.approx(0.0, abs=1e-9)
    assert always.ground(QUERY, [DOC], abstain=False).evidence  # the switch turns it off
    # the ablation: the same grounder without its prior returns what a grounder without a prior returns
    plain = tiny_grounder.ground(QUERY, [DOC])
    ablated = g.ground(QUERY, [DOC], use_prior=False)
    assert [(e.sentence_start, e.sentence_end) for e in ablated.evidence] == [
        (e.sentence_start, e.sentence_end) for e in plain.evidence]
    assert [e.score for e in ablated.evidence] == pytest.approx([e.score for e in plain.evidence], abs=1e-5)


def test_abstention_features_use_the_first_position_end_probability():
    a = Abstention((2.0, 0.0, 0.0, 0.0), 2.0)  # the more the model wants to end at once, the likelier "none"
    assert a.probability([math.log(0.01), 0, 0, 0]) < 0.5 < a.probability([math.log(0.9), 0, 0, 0])
    with pytest.raises(ValueError):
        a.probability([0.0])
    with pytest.raises(ValueError):
        Abstention.from_dict({"coefficients": [1.0]})


def test_adapter_settings_read_prior_and_abstention(tmp_path):
    (tmp_path / "cfic.json").write_text(json.dumps({
        "threshold": None, "prior": {"weights": {"sentence": 2.0, "paragraph": 1.0, "bm25": 0.5, "lm": 0.5}},
        "abstention": {"coefficients": [1, 2, 3, 4], "intercept": -1.0, "threshold": 0.6}}))
    got = adapter_settings(tmp_path)
    assert got["prior"] == PriorWeights(2.0, 1.0, 0.5, 0.5)
    assert got["abstention"] == Abstention((1.0, 2.0, 3.0, 4.0), -1.0, 0.6)
    assert got["threshold"] is None
    (tmp_path / "cfic.json").write_text(json.dumps({"prior": {"weights": {"sentence": "x"}}}))
    with pytest.raises(ModelLoadError):
        adapter_settings(tmp_path)
    (tmp_path / "cfic.json").write_text(json.dumps({"abstention": {"coefficients": [1], "intercept": 0,
                                                                   "threshold": 3}}))
    with pytest.raises(ModelLoadError):
        adapter_settings(tmp_path)
    assert adapter_settings(None) == {}


def test_fitting_finds_the_informative_signal_and_separates_classes():
    rng = np.random.default_rng(0)
    items = []
    for _ in range(40):
        sig = rng.normal(size=(30, 4)).astype(np.float32)
        sig[:, 3] = rng.integers(0, 2, size=30)  # the answer-type signal is 0/1
        mask = np.zeros(30, dtype=bool)
        mask[int(np.argmax(sig[:, 1]))] = True  # only the paragraph signal knows the answer
        items.append((sig, mask))
    direction, rate = fit_signal_weights(items, k=1)
    assert rate == 1.0 and direction[1] > 0 and direction[0] == 0 and direction[2] == 0 and direction[3] == 0
    assert not all(top_hit(sig[:, 0], mask, 1) for sig, mask in items)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] - 2 * x[:, 3] > 0).astype(float)
    coef, intercept, _, _ = fit_logistic(x, y)
    acc = np.mean(((x @ coef + intercept) > 0) == (y == 1))
    assert acc > 0.95 and coef[0] > 0 > coef[3]


def test_paired_gain_of_two_fit_settings_has_an_interval_around_the_difference():
    from cfic.training.fit_prior import _paired_gain

    a, b = ("s", 0.5), ("s", 0.0)
    hits = {"nq": {a: [True] * 30 + [False] * 10, b: [True] * 20 + [False] * 20},
            "squad": {a: [True, False] * 10, b: [True, False] * 10}}
    gain = _paired_gain(hits, a, b)
    assert gain["difference"] == pytest.approx((0.25 + 0.0) / 2)
    assert 0.0 < gain["low"] < gain["difference"] < gain["high"]
    same = _paired_gain(hits, b, b)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_the_answer_type_signal_marks_sentences_holding_what_the_question_asks_for():
    from cfic.prior import asked_answer_type, sentence_answer_types

    texts = ["The Normans were in contact with England from an early date.",
             "In 1066, Duke William II of Normandy conquered England.",
             "Three hundred knights crossed the channel.",
             "They married into the local nobility."]
    types = sentence_answer_types(texts)
    assert types.tolist() == [[0, 0], [1, 1], [0, 1], [0, 0]]  # a year is also a number; "date" alone is not one
    assert asked_answer_type("When did the Normans conquer England?") == 0
    assert asked_answer_type("In what year was the treaty signed?") == 0
    assert asked_answer_type("How many knights crossed?") == 1
    assert asked_answer_type("Who conquered England?") is None
    assert asked_answer_type("¿Cuándo conquistaron Inglaterra?") is None  # silent outside English
    text = " ".join(texts)
    from cfic.text import split_sentences

    sentences = split_sentences(text)
    prior = SentencePrior()
    feats = prior.features(text, sentences)
    for query, column in (("When did the Normans conquer England?", [0, 1, 0, 0]),
                          ("How many knights crossed the channel?", [0, 1, 1, 0]),
                          ("Who ruled England?", [0, 0, 0, 0])):
        sig = SentencePrior.signals(query, prior.query_vector(query), feats)
        assert sig[:, 3].tolist() == column, query
    # with the answer-type weight the dated sentence overtakes the topical one for the "when" question
    query = "When did the Normans conquer England?"
    sig = SentencePrior.signals(query, prior.query_vector(query), feats)
    without = SentencePrior.log_prior(sig, PriorWeights(10.0, 0.0, 0.0, answer_type=0.0))
    with_type = SentencePrior.log_prior(sig, PriorWeights(10.0, 0.0, 0.0, answer_type=10.0))
    assert int(np.argmax(with_type)) == 1 and with_type[1] - with_type[0] > without[1] - without[0]


def test_distinct_spans_start_again_outside_merged_spans(tiny_loaded, prior_grounder):
    """With LM weight 0, spans that overlap (and merge) are topped up from the next-ranked uncovered sentences."""
    from cfic.decoding.skip import SpanEnd
    from cfic.grounder import _uncovered

    reserve = [(None, 1), (None, 5), (None, 6), (None, 9)]
    ends = [SpanEnd(0, 3, (0.1, 0.2, 0.9)), SpanEnd(2, 4, (0.1, 0.9))]  # one piece: sentences 0..3
    assert [s for _, s in _uncovered(reserve, ends, 3)] == [5, 6]  # 1 is covered; two pieces were missing
    assert _uncovered(reserve, [SpanEnd(0, 1, (0.9,)), SpanEnd(4, 5, (0.9,)), SpanEnd(7, 8, (0.9,))], 3) == []

    doc = " ".join(f"Sentence number {i} talks about the river and its {w}." for i, w in
                   enumerate(["banks", "fish", "boats", "bridges", "towns", "floods", "mills", "source", "delta",
                              "ferries", "birds", "reeds"]))
    base = prior_grounder.config.with_options(prior=PriorWeights(10.0, 5.0, 1.0, 0.0), max_span_tokens=96)
    pieces = {}
    for distinct in (False, True):
        g = Grounder(tiny_loaded, base.with_options(distinct_spans=distinct),
                     sentence_prior=prior_grounder.sentence_prior)
        r = g.ground(QUERY, [doc], abstain=False)
        pieces[distinct] = sorted((e.sentence_start, e.sentence_end) for e in r.evidence)
        for e in r.evidence:
            assert e.text == doc[e.start_char:e.end_char]
    assert len(pieces[False]) < 3  # this document and model make the top-3 spans overlap: the case under test
    assert len(pieces[True]) == 3
    assert all(a[1] <= b[0] for a, b in zip(pieces[True], pieces[True][1:], strict=False))  # disjoint


OFF_TOPIC = [
    "Flour, eggs and butter make a cake. Bake it for forty minutes. Let it cool before slicing.",
    "Chess openings control the centre early. Knights move in an L shape. Castling protects the king.",
    "Income tax is due every April. Receipts must be kept for six years. Late filing costs a fee.",
]


def test_many_documents_read_only_those_holding_the_best_starts(tiny_loaded, prior_grounder):
    """LM weight 0: the prior picks the starts over all documents and scores every span, so documents are read best
    first until no unread one could enter the top k. The evidence is exactly what reading every document gives."""
    cfg = prior_grounder.config.with_options(prior=PriorWeights(10.0, 5.0, 1.0, 0.0))
    g = Grounder(tiny_loaded, cfg, sentence_prior=prior_grounder.sentence_prior)
    everything = Grounder(tiny_loaded, cfg.with_options(read_all_documents=True),
                          sentence_prior=prior_grounder.sentence_prior)
    docs = [OFF_TOPIC[0], DOC, *OFF_TOPIC[1:]]
    planned = g._plan(g._normalise(docs))
    log_priors = SentencePrior.log_priors(g._signals(QUERY, planned), cfg.prior)
    assert sum(float(np.exp(lp).sum()) for lp in log_priors) == pytest.approx(1.0, abs=1e-5)
    order = g._reading_order(log_priors, cfg)
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3]  # the river document first
    assert g._first_reads(log_priors, order, cfg) == [1]  # it holds the three best sentences
    assert g._reading_order(log_priors, cfg.with_options(prior=PriorWeights(10.0, 5.0, 1.0, 0.5))) is None
    assert everything._reading_order(log_priors, everything.config) is None

    for top_k in (1, 3, 6):  # 6: more pieces than the river document gives, so others must be read too
        lazy = g.ground(QUERY, docs, top_k=top_k, abstain=False)
        full = everything.ground(QUERY, docs, top_k=top_k, abstain=False)
        assert [(e.document_index, e.sentence_start, e.sentence_end, e.text) for e in lazy.evidence] == [
            (e.document_index, e.sentence_start, e.sentence_end, e.text) for e in full.evidence]
        assert [e.score for e in lazy.evidence] == pytest.approx([e.score for e in full.evidence], rel=1e-5)
        if top_k == 1:  # the off-topic documents were never read
            alone = g.ground(QUERY, [DOC], top_k=1, abstain=False)
            assert lazy.usage.input_tokens == alone.usage.input_tokens < full.usage.input_tokens
            mass = float(np.exp(log_priors[1]).sum())  # a score is the start's share of the prior over all docs
            assert lazy.evidence[0].score == pytest.approx(alone.evidence[0].score * mass, rel=1e-4)
    assert {e.document_index for e in g.ground(QUERY, docs, top_k=6, abstain=False).evidence} - {1}


def test_one_documents_prior_is_unchanged_by_the_joint_normalisation(prior_grounder):
    planned = prior_grounder._plan(prior_grounder._normalise([DOC]))
    sig = prior_grounder._signals(QUERY, planned)
    w = prior_grounder.config.prior
    np.testing.assert_allclose(SentencePrior.log_priors(sig, w)[0], SentencePrior.log_prior(sig[0], w), atol=1e-6)
    alone = SentencePrior.signals(QUERY, prior_grounder.sentence_prior.query_vector(QUERY), planned[0].features)
    np.testing.assert_allclose(sig[0], alone)

"""The paragraph question-likelihood reading: its batched scores, its terms, and how the grounder uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfic.config import GroundingConfig
from cfic.errors import CficError
from cfic.grounder import Grounder
from cfic.prior import PriorWeights, SentencePrior, paragraph_bounds
from cfic.question_likelihood import (
    PASSAGE_PROMPT,
    QUESTION_TEXT,
    QuestionLikelihood,
    best_paragraphs,
    question_log_likelihoods,
    reading_terms,
)

PARAGRAPHS = [
    "The Normans came from Normandy. They conquered England in 1066.",
    "Rollo was their first ruler. He made a treaty with the king of the Franks.",
    "The Rhine flows north into the sea. Its delta lies in the Netherlands.",
    "Paris is the capital of France. It lies on the river Seine.",
]
DOC = "\n\n".join(PARAGRAPHS)
QUESTION = "When did the Normans conquer England?"


@pytest.mark.numerics
def test_batched_scores_equal_one_unpadded_forward_per_passage(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    got = question_log_likelihoods(model, tok, PARAGRAPHS, QUESTION, 400)
    q_ids = tok(QUESTION_TEXT.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    for p, value in zip(PARAGRAPHS, got, strict=True):
        p_ids = tok(PASSAGE_PROMPT.format(passage=p), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + q_ids])
        with torch.no_grad():
            log_p = torch.log_softmax(model(ids).logits.float()[0], -1)
        ref = np.mean([float(log_p[len(p_ids) - 1 + i, t]) for i, t in enumerate(q_ids)])
        assert value == pytest.approx(ref, abs=2e-3)
    assert np.ptp(got) > 1e-3  # random weights still tell the passages apart


def test_best_paragraphs_rank_by_the_best_sentence_over_all_documents():
    log_priors = [np.array([-3.0, -1.0, -5.0]), np.array([-2.0, -0.5])]
    paragraph_of = [np.array([0, 0, 1]), np.array([0, 1])]
    assert best_paragraphs(log_priors, paragraph_of, 3) == [(1, 1), (0, 0), (1, 0)]
    assert best_paragraphs(log_priors, paragraph_of, 10) == [(1, 1), (0, 0), (1, 0), (0, 1)]


def test_reading_terms_are_at_most_zero_and_order_paragraphs_by_likelihood():
    paragraph_of = [np.array([0, 0, 1, 2]), np.array([0, 1])]
    read = [(0, 1), (1, 0), (0, 0)]
    ll = np.array([-2.0, -1.0, -3.0])
    terms = reading_terms(ll, read, paragraph_of, 2.0)
    assert all((t <= 0).all() for t in terms)
    assert terms[1][0] == 0.0  # the most likely paragraph keeps its prior
    assert terms[0][2] > terms[0][0]  # (0, 1) read as more likely than (0, 0)
    assert terms[0][0] == terms[0][1]  # one term per paragraph
    unread = terms[0][3]
    assert unread == terms[1][1] == pytest.approx(float(min(terms[0][0], terms[0][2])))
    assert all((t == 0).all() for t in reading_terms(ll, read, paragraph_of, 0.0))


def test_settings_are_checked_and_round_trip():
    q = QuestionLikelihood(2.5, 6, 300, enabled=False)
    assert QuestionLikelihood.from_dict(q.to_dict()) == q
    for bad in ({"weight": -1.0}, {"weight": True}, {"weight": 1.0, "paragraphs": 0},
                {"weight": 1.0, "max_passage_tokens": 2.5}, {"weight": 1.0, "enabled": "no"}):
        with pytest.raises(CficError):
            QuestionLikelihood(**bad)
    with pytest.raises(CficError):
        GroundingConfig(question_likelihood=2.0)


def test_a_heavy_reading_starts_in_the_paragraph_the_lm_finds_the_question_most_likely_after(tiny_loaded):
    """With a dominant weight the start search follows the reading; with it off, the prior — and the two differ
    here, so the test fails if the reading is ignored or inverted."""
    prior = PriorWeights(10.0, 5.0, 1.0, 0.0)
    plain = Grounder(tiny_loaded, GroundingConfig(prior=prior, top_k=1))
    heavy = Grounder(tiny_loaded, GroundingConfig(prior=prior, top_k=1,
                                                  question_likelihood=QuestionLikelihood(1e5, paragraphs=4)))
    ll = question_log_likelihoods(tiny_loaded.model, tiny_loaded.tokenizer, PARAGRAPHS, QUESTION, 400)
    bounds = paragraph_bounds(DOC)

    def paragraph(evidence) -> int:
        return next(j for j, (a, b) in enumerate(bounds) if a <= evidence.start_char < b)

    # the prior starts in the Normans paragraph; this random model finds the question likelier after another one
    assert int(np.argmax(ll)) != 0
    read = heavy.ground(QUESTION, [DOC])
    off = heavy.ground(QUESTION, [DOC], use_question_likelihood=False)
    base = plain.ground(QUESTION, [DOC])
    assert paragraph(base.evidence[0]) == 0
    assert paragraph(read.evidence[0]) == int(np.argmax(ll))
    assert [e.text for e in off.evidence] == [e.text for e in base.evidence]
    assert off.usage.reading_ms == 0.0 and read.usage.reading_ms > 0.0
    # shipped switched off, it reads only when asked; without a reading configured, asking is an error
    dormant = Grounder(tiny_loaded, GroundingConfig(prior=prior, top_k=1, question_likelihood=QuestionLikelihood(
        1e5, paragraphs=4, enabled=False)))
    assert [e.text for e in dormant.ground(QUESTION, [DOC]).evidence] == [e.text for e in base.evidence]
    asked = dormant.ground(QUESTION, [DOC], use_question_likelihood=True)
    assert [e.text for e in asked.evidence] == [e.text for e in read.evidence]
    with pytest.raises(CficError):
        plain.ground(QUESTION, [DOC], use_question_likelihood=True)
    for e in read.evidence:
        assert DOC[e.start_char:e.end_char] == e.text


def test_adapter_settings_bring_the_reading_and_reject_a_broken_one(tmp_path):
    from cfic.models import ModelLoadError, adapter_settings

    (tmp_path / "cfic.json").write_text(json.dumps({"question_likelihood": {"weight": 3.0, "paragraphs": 4}}))
    assert adapter_settings(tmp_path)["question_likelihood"] == QuestionLikelihood(3.0, 4, 400)
    assert "question_likelihood" not in adapter_settings(tmp_path, skip={"question_likelihood"})
    for broken in ({"weight": "x"}, {"weight": -1.0}, {"paragraphs": 4}, {"weight": 1.0, "enabled": 1}):
        (tmp_path / "cfic.json").write_text(json.dumps({"question_likelihood": broken}))
        with pytest.raises(ModelLoadError):
            adapter_settings(tmp_path)


def test_the_reading_keeps_the_priors_jointly_normalised_and_asks_for_a_prior(tiny_loaded):
    prior = PriorWeights(10.0, 5.0, 1.0, 0.0)
    g = Grounder(tiny_loaded, GroundingConfig(prior=prior, top_k=1,
                                              question_likelihood=QuestionLikelihood(3.0, paragraphs=4)))
    docs = [DOC, "A short note. It has no blank lines at all."]
    plans = g.plan(docs)
    base = SentencePrior.log_priors(g._signals(QUESTION, plans), prior)
    read = g._read_paragraphs(QUESTION, plans, base, g.config.question_likelihood)
    flat = np.concatenate(read)
    assert np.exp(flat).sum() == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(flat, np.concatenate(base))
    with pytest.raises(CficError):
        g.ground(QUESTION, [DOC], use_prior=False, use_question_likelihood=True)


def test_a_cancelled_question_stops_before_the_reading(tiny_loaded):
    """The reading is a forward pass of its own (the HF model's, which the layer runner never calls): a cancelled
    request must not pay for it (REST cancels on a disconnect). A forward hook counts the model's calls."""
    from cfic.errors import GroundingCancelled

    g = Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0), top_k=1,
                                              question_likelihood=QuestionLikelihood(3.0, paragraphs=4)))
    calls: list[int] = []
    handle = tiny_loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(GroundingCancelled):
            g.ground(QUESTION, [DOC], cancel=lambda: True)
        assert calls == []
        assert g.ground(QUESTION, [DOC], cancel=lambda: False).usage.reading_ms > 0.0
        assert calls  # the hook does see the reading when it runs
    finally:
        handle.remove()

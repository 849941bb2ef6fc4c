"""The question pass's sentence attention against the model's own attention weights (HF eager attention)."""

from __future__ import annotations

import copy

import pytest
import torch

from cfic.decoding.attention import QueryUpdate
from cfic.decoding.encode import question_pass
from cfic.errors import CficError
from cfic.grounder import Grounder

DOC = ("The Normans came from Normandy. They conquered England in 1066. "
       "Rollo was their first ruler. The Rhine flows north.")
QUESTION = "When did the Normans conquer England?"


def _reference(loaded, ids: list[int], bounds: list[int], n_question: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and head, the attention mass on each sentence from the question's last token and averaged over
    the question tokens, from ``model(..., output_attentions=True)`` with eager attention."""
    model = loaded.model
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.config._attn_implementation = saved
    last, mean = [], []
    for layer in out.attentions:  # [1, heads, n, n]
        rows = layer[0, :, -n_question:]  # the question's rows
        mass = torch.stack([rows[..., a:b].sum(-1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], -1)
        last.append(mass[:, -1])
        mean.append(mass.mean(1))
    return torch.stack(last), torch.stack(mean)


def _one_window(tiny_loaded):
    """A grounder, DOC's encoding, its one window, the window's segment lengths and QUESTION's ids."""
    grounder = Grounder(tiny_loaded)
    enc = grounder.encode([DOC])[0]
    window = enc.windows[0]
    lengths = [len(enc.segment_ids[s]) for s in range(window.first, window.last)]
    query_ids = grounder.template.query_ids(grounder.tokenizer, QUESTION, grounder.config.max_query_tokens)
    return grounder, enc, window, lengths, query_ids


@pytest.mark.numerics
def test_sentence_attention_matches_the_models_own_attention_weights(tiny_loaded):
    grounder, enc, window, lengths, query_ids = _one_window(tiny_loaded)
    with torch.inference_mode():
        plain = question_pass(grounder.runner, window, query_ids, 8)
        tapped = question_pass(grounder.runner, window, query_ids, 8, segment_lengths=lengths)
    att = tapped.attention
    assert att is not None and len(lengths) >= 4
    assert att.last.shape == (grounder.runner.num_layers, tiny_loaded.model.config.num_attention_heads, len(lengths))
    # the tap changes nothing the pass computes
    torch.testing.assert_close(tapped.first, plain.first)

    head = window.n_tokens - sum(lengths)
    ids = list(grounder.template.head_ids) + [t for s in range(window.first, window.last) for t in enc.segment_ids[s]]
    bounds = [head, *(head + sum(lengths[: i + 1]) for i in range(len(lengths)))]
    ref_last, ref_mean = _reference(tiny_loaded, ids + query_ids, bounds, len(query_ids))
    torch.testing.assert_close(att.last, ref_last, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(att.mean, ref_mean, atol=2e-4, rtol=1e-3)
    # random weights still spread attention: the per-sentence masses are not all alike
    assert float(att.last.std()) > 1e-3
    assert torch.equal(att.tokens, torch.tensor(lengths, dtype=torch.float32))


@pytest.mark.numerics
def test_sentence_attention_with_the_probe_split_is_the_same(tiny_loaded):
    """The answerability probe splits the question pass at a middle layer; the tap still sees every layer."""
    grounder, _, window, lengths, query_ids = _one_window(tiny_loaded)
    with torch.inference_mode():
        whole = question_pass(grounder.runner, window, query_ids, 8, segment_lengths=lengths).attention
        split = question_pass(grounder.runner, window, query_ids, 8, tap_layer=1, segment_lengths=lengths).attention
    torch.testing.assert_close(split.last, whole.last)
    torch.testing.assert_close(split.mean, whole.mean)


# ---------------------------------------------------------------- the attention ranker and its fusion


def _ranker(layers: int, heads: int, *, length_weight: float = 0.0, fusion: float = 1.0, seed: int = 0,
            calibrated: bool = False):
    import numpy as np

    from cfic.attention import AttentionRanker

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2, layers, heads)).astype(np.float32)
    null = rng.normal(size=(2, layers, heads)).astype(np.float32) if calibrated else None
    return AttentionRanker(w, length_weight, fusion, null_weights=null)


def test_ranker_file_round_trip_and_refusals(tmp_path):
    import numpy as np

    from cfic.attention import AttentionRanker
    from cfic.errors import CficError, ModelLoadError
    from cfic.models import adapter_attention_alone, adapter_settings

    ranker = _ranker(2, 4, length_weight=0.5, fusion=2.0, calibrated=True)
    ranker.save(tmp_path / "r.safetensors")
    back = AttentionRanker.load(tmp_path / "r.safetensors")
    assert back == ranker and back.calibrated and back.fusion == 2.0
    assert ranker.with_fusion(1.0) != ranker
    powered = ranker.with_fusion(2.0, -1.5)
    powered.save(tmp_path / "p.safetensors")
    assert AttentionRanker.load(tmp_path / "p.safetensors") == powered != ranker
    assert AttentionRanker.load(tmp_path / "p.safetensors").fusion_power == -1.5
    (tmp_path / "cfic.json").write_text('{"attention": {"file": "r.safetensors"}}')
    assert adapter_settings(tmp_path)["attention"] == ranker
    assert adapter_attention_alone(tmp_path) is None
    alone = _ranker(2, 4, seed=1)
    alone.save(tmp_path / "alone.safetensors")
    (tmp_path / "cfic.json").write_text('{"attention": {"file": "r.safetensors", "alone": "alone.safetensors"}}')
    assert adapter_attention_alone(tmp_path) == alone and adapter_settings(tmp_path)["attention"] == ranker
    (tmp_path / "cfic.json").write_text('{"attention": {"file": "missing.safetensors"}}')
    with pytest.raises(ModelLoadError):
        adapter_settings(tmp_path)
    assert "attention" not in adapter_settings(tmp_path, skip={"attention"})  # a refit can replace it
    with pytest.raises(CficError):
        ranker.check(3, 4)
    with pytest.raises(CficError):
        AttentionRanker(np.zeros((3, 2, 4), dtype=np.float32), 0.0, 1.0)
    with pytest.raises(CficError):
        AttentionRanker(np.zeros((2, 2, 4), dtype=np.float32), 0.0, -1.0)


@pytest.mark.numerics
def test_fused_prior_never_exceeds_the_prior_and_follows_the_attention(tiny_loaded):
    """The fused log prior is the prior plus fusion x a log-probability (<= 0): best-first reading's bound holds,
    and the order inside the window moves toward what the ranker scores highest."""
    from cfic.decoding.attention import SentenceAttention

    s = 6
    att = SentenceAttention(torch.rand(2, 3, s), torch.rand(2, 3, s), torch.tensor([5.0, 9, 3, 40, 7, 8]))
    ranker = _ranker(2, 3, length_weight=4.0, fusion=50.0)
    ranker = type(ranker)(ranker.weights * 0, 4.0, 50.0)  # the length term alone: the longest sentence wins
    log_prior = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.5, 0.2, 2.5, 1.0]), 0)
    fused = ranker.fused(log_prior, 1, att)
    assert bool((fused <= log_prior + 1e-6).all())
    assert torch.equal(fused[0], log_prior[0]) and torch.equal(fused[7], log_prior[7])  # outside the window
    assert int(fused[1:7].argmax()) == 3  # sentence 4 of the document: 40 tokens
    assert torch.equal(fused[4], log_prior[4])  # the window's best by attention keeps its prior mass
    assert torch.allclose(ranker.log_probabilities(att).exp().sum(), torch.tensor(1.0))


@pytest.mark.numerics
def test_grounder_fuses_the_ranker_into_the_start_search(tiny_loaded):
    """A ranker whose only term is each sentence's length, at a large fusion weight, makes the longest sentence
    the best start; use_attention=False gives exactly the prior's evidence; spans stay verbatim."""
    from cfic import GroundingConfig
    from cfic.attention import AttentionRanker
    from cfic.prior import PriorWeights

    doc = ("Short one. " + "This sentence is much longer than every other sentence of this small document here. "
           + "The Normans conquered England in 1066. Tiny. Another short line.")
    layers, heads = 2, tiny_loaded.model.config.num_attention_heads
    import numpy as np

    ranker = AttentionRanker(np.zeros((2, layers, heads), dtype=np.float32), 20.0, 50.0)
    base = GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0), top_k=1)
    plain = Grounder(tiny_loaded, base)
    fused = Grounder(tiny_loaded, base.with_options(attention=ranker), sentence_prior=plain.sentence_prior)
    q = "When did the Normans conquer England?"
    a = plain.ground(q, [doc])
    b = fused.ground(q, [doc])
    c = fused.ground(q, [doc], use_attention=False)
    sentences = fused.split(doc)
    longest = max(range(len(sentences)), key=lambda i: len(sentences[i].text))
    assert b.evidence and b.evidence[0].sentence_start == longest
    assert a.evidence[0].sentence_start != longest  # the prior alone starts elsewhere: the fusion moved it
    assert [(e.start_char, e.end_char) for e in c.evidence] == [(e.start_char, e.end_char) for e in a.evidence]
    for e in (*a.evidence, *b.evidence):
        assert e.text == doc[e.start_char:e.end_char]
    # the attention alone: a log-probability per sentence, best at the longest
    scores = fused.attention_log_probabilities(q, [doc])[0]
    assert int(np.argmax(scores)) == longest and abs(float(np.exp(scores).sum()) - 1.0) < 1e-4
    with pytest.raises(CficError):
        plain.attention_log_probabilities(q, [doc])
    with pytest.raises(CficError):
        Grounder(tiny_loaded, base.with_options(attention=_ranker(3, heads)))


def test_fusion_power_scales_the_attention_term_by_the_window_sentence_count():
    """fusion(n) = fusion * (n / 64) ** power: with power -1 a 128-sentence window's attention term is half the
    power-0 ranker's and a 32-sentence window's twice; the order inside each window is the same either way."""
    import numpy as np

    from cfic.attention import REFERENCE_SENTENCES
    from cfic.decoding.attention import SentenceAttention

    ranker = _ranker(2, 3, fusion=1.5)
    powered = ranker.with_fusion(1.5, -1.0)
    for n, factor in ((2 * REFERENCE_SENTENCES, 0.5), (REFERENCE_SENTENCES // 2, 2.0), (REFERENCE_SENTENCES, 1.0)):
        g = torch.Generator().manual_seed(n)
        att = SentenceAttention(torch.rand(2, 3, n, generator=g), torch.rand(2, 3, n, generator=g),
                                torch.full((n,), 10.0))
        log_prior = torch.log_softmax(torch.randn(n + 2, generator=g), 0)
        plain_term = ranker.fused(log_prior, 1, att) - log_prior
        powered_term = powered.fused(log_prior, 1, att) - log_prior
        assert float(plain_term.abs().max()) > 0.1
        assert torch.allclose(powered_term, factor * plain_term, atol=1e-5)
        assert powered.fusion_at(n) == pytest.approx(1.5 * factor)
        assert np.array_equal(np.argsort(-powered_term[1:-1].numpy()), np.argsort(-plain_term[1:-1].numpy()))


def test_cross_validation_lowers_the_fusion_in_long_documents_when_the_attention_only_reads_short_ones():
    """Short documents whose evidence one head marks, long ones where that head points away from it and the prior
    knows the evidence: one fusion weight for both loses one of the two, a negative power keeps both."""
    import numpy as np

    from cfic.training.attention_data import AttentionItem
    from cfic.training.fit_attention import cross_validate, setting_key

    rng = np.random.default_rng(2)
    items = []
    for i in range(60):
        short = i % 2 == 0
        s = 16 if short else 512
        evidence = np.zeros(s, dtype=bool)
        evidence[rng.integers(s)] = True
        att = rng.uniform(0.001, 0.01, size=(2, 2, 3, s)).astype(np.float32)
        att[0, 1, 2, evidence if short else rng.integers(s, size=3)] = 0.2
        log_prior = rng.normal(0, 1.0, s).astype(np.float32)
        if not short:
            log_prior[evidence] += 5.0  # the prior knows the long documents' evidence
        items.append(AttentionItem("hotpotqa" if short else "nq", att, att * 0 + 0.01, np.full(s, 10, np.float32),
                                   log_prior, evidence, evidence, f"doc{i}"))
    hits = cross_validate(items, False, None, 1, l2_grid=(0.01,), fusion_grid=(0.0, 2.0), power_grid=(0.0, -2.0))
    assert setting_key(0.01, 2.0, -2.0) in hits and setting_key(0.01, 0.0, -2.0) not in hits
    one_weight = np.mean(hits[setting_key(0.01, 2.0, 0.0)])
    powered = np.mean(hits[setting_key(0.01, 2.0, -2.0)])
    assert powered > one_weight + 0.2
    assert powered > np.mean(hits[setting_key(0.01, 0.0, 0.0)]) + 0.2


def test_listwise_fit_finds_the_informative_head():
    """Material where one head's attention marks the evidence: the fit weights that head most, and the
    cross-validated fused ranking beats the prior alone."""
    import numpy as np

    from cfic.training.attention_data import AttentionItem
    from cfic.training.fit_attention import _feature_mask, cross_validate, features, fit_weights

    rng = np.random.default_rng(0)
    items = []
    for i in range(40):
        s = 30
        evidence = np.zeros(s, dtype=bool)
        evidence[rng.integers(s)] = True
        att = rng.uniform(0.001, 0.01, size=(2, 2, 3, s)).astype(np.float32)
        att[0, 1, 2, evidence] = 0.2  # row 0, layer 1, head 2 looks at the evidence
        log_prior = np.log(np.full(s, 1.0 / s, dtype=np.float32)) + rng.normal(0, 0.1, s).astype(np.float32)
        items.append(AttentionItem("nq" if i % 2 else "squad", att, att * 0 + 0.01, np.full(s, 10, np.float32),
                                   log_prior, evidence, evidence))
    mask = _feature_mask((2, 2, 3), False, None)
    w = fit_weights([features(it, False) for it in items], [it.evidence for it in items], 0.01, mask)
    assert int(np.argmax(np.abs(w[:-1]))) == np.ravel_multi_index((0, 1, 2), (2, 2, 3))
    hits = cross_validate(items, False, None, 1, l2_grid=(0.01,), fusion_grid=(0.0, 1.0))
    assert np.mean(hits["fused/0.01/1.0"]) > np.mean(hits["fused/0.01/0.0"]) + 0.5
    assert np.mean(hits["attention/0.01"]) > 0.9
    # fitted on top of the prior (residual), the fused ranking finds the evidence too
    residual = cross_validate(items, False, None, 1, l2_grid=(0.01,), fusion_grid=(0.0, 1.0), residual=True)
    assert np.mean(residual["fused/0.01/1.0"]) > np.mean(residual["fused/0.01/0.0"]) + 0.5
    # the SwiftKV mask gives the mean row no weight from that layer on
    assert not _feature_mask((2, 2, 3), False, 1).reshape(-1)[:-1].reshape(2, 2, 3)[1, 1].any()


def test_cross_validation_folds_by_document_so_an_article_specific_head_does_not_look_transferable():
    """Two articles whose evidence is marked by different heads: folded by document, the ranker is always scored on
    the article it did not learn, and its out-of-fold hit rate stays at chance; the folds keep each article whole and
    put the two large ones apart."""
    import numpy as np

    from cfic.training.attention_data import AttentionItem
    from cfic.training.fit_attention import cross_validate, document_folds

    rng = np.random.default_rng(1)
    items = []
    for i in range(60):
        s, article = 20, "squad:A" if i < 30 else "squad:B"
        evidence = np.zeros(s, dtype=bool)
        evidence[rng.integers(s)] = True
        att = rng.uniform(0.001, 0.01, size=(2, 2, 3, s)).astype(np.float32)
        att[0, 0 if article == "squad:A" else 1, 2, evidence] = 0.2  # a different head marks each article's evidence
        att[0, 1 if article == "squad:A" else 0, 2, ~evidence] = 0.2  # ... and the other head points away from it
        items.append(AttentionItem("squad", att, att * 0 + 0.01, np.full(s, 10, np.float32),
                                   np.zeros(s, np.float32), evidence, evidence, article))
    singles = [AttentionItem("nq", it.attention, it.null_attention, it.tokens, it.log_prior, it.evidence, it.answer,
                             f"nq:{i}") for i, it in enumerate(items[:13])]
    fold = document_folds(items + singles, 5)
    for article in ("squad:A", "squad:B"):
        assert len({int(fold[i]) for i, it in enumerate(items) if it.group == article}) == 1
    assert fold[0] != fold[30]
    hits = cross_validate(items, False, None, 1, l2_grid=(0.01,), fusion_grid=(0.0,), folds=2)
    assert np.mean(hits["attention/0.01"]) < 0.3  # chance is 1/20; a fold that mixed the articles would learn both


# ---------------------------------------------------------------- the second hop


@pytest.mark.numerics
def test_second_hop_keeps_the_first_evidence_and_adds_spans_outside_it(tiny_loaded):
    from cfic import GroundingConfig
    from cfic.prior import PriorWeights

    doc = ("Ed Wood was directed by Tim Burton. Tim Burton was born in Burbank, California. "
           "The film won two Academy Awards. Burbank is a city in Los Angeles County. "
           "Johnny Depp played the lead. The weather was mild that year.")
    g = Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0), top_k=2, max_span_tokens=16,
                                              max_sentence_tokens=16))
    q = "Where was the director of Ed Wood born?"
    one = g.ground(q, [doc])
    two = g.ground(q, [doc], hops=2)
    assert one.evidence and two.evidence
    best = one.evidence[0]
    assert (two.evidence[0].start_char, two.evidence[0].end_char) == (best.start_char, best.end_char)
    assert len(two.evidence) == 2
    a, b = sorted((e.sentence_start, e.sentence_end) for e in two.evidence)
    assert a[1] <= b[0]  # no overlap
    for e in two.evidence:
        assert e.text == doc[e.start_char:e.end_char]
    # the second hop's question is the question and the bridge, cut to fit
    hop = g._hop_query(q, best.text, g.config)
    assert hop.startswith(q) and len(hop) > len(q)
    tight = g.config.with_options(max_query_tokens=len(g.tokenizer(q)["input_ids"]) + 4)
    assert g._hop_query(q, best.text * 20, tight) == q
    with pytest.raises(CficError):
        GroundingConfig(hops=3)


# ---------------------------------------------------------------- the span end from the search's scores


def test_score_span_end_takes_sentences_within_the_margin_and_the_budget():
    from cfic.decoding.prefix import Prefix
    from cfic.decoding.skip import SpanSearch, score_span_end

    answer = [(1, 2, 3)] * 6
    segments = [(1, 2, 3, 4)] * 6  # 4 tokens each
    scores = torch.tensor([-1.0, -1.5, -1.2, -5.0, -1.0, -1.1])
    search = SpanSearch(answer, segments, 6, 12, (0,), 0)
    p = Prefix(0, (), 0.0, ())
    # start 0: sentence 1 (-1.5) and 2 (-1.2) lie within 1.0 of -1.0; 3 (-5.0) does not
    assert [(e.start, e.end) for e in score_span_end([(p, 0)], search, scores, 1.0)] == [(0, 3)]
    assert [(e.start, e.end) for e in score_span_end([(p, 0)], search, scores, 0.1)] == [(0, 1)]
    # the budget (12 tokens: the start's 3 + two segments of 4) stops it before the margin would
    assert [(e.start, e.end) for e in score_span_end([(p, 4)], search, scores, 100.0)] == [(4, 6)]
    assert [(e.start, e.end) for e in score_span_end([(p, 0)], search, scores, 100.0)] == [(0, 3)]
    end = score_span_end([(p, 0)], search, scores, 1.0)[0]
    assert end.end_probabilities[0] == 1.0 and all(0 < x <= 1 for x in end.end_probabilities)


@pytest.mark.numerics
def test_grounder_ends_spans_by_scores_without_a_forward_pass(tiny_loaded):
    from cfic import GroundingConfig
    from cfic.prior import PriorWeights

    doc = ("The Normans came from Normandy. They conquered England in 1066. Rollo was their first ruler. "
           "The Rhine flows north. Paris is in France.")
    g = Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0), top_k=1))
    q = "When did the Normans conquer England?"
    tight = g.ground(q, [doc], score_end_margin=0.0)
    wide = g.ground(q, [doc], score_end_margin=1e6)
    ref = g.ground(q, [doc])
    assert tight.evidence[0].sentence_start == wide.evidence[0].sentence_start == ref.evidence[0].sentence_start
    assert tight.evidence[0].sentence_end <= wide.evidence[0].sentence_end
    assert wide.evidence[0].sentence_end == len(g.split(doc))  # the budget is large: every following sentence
    for e in (*tight.evidence, *wide.evidence):
        assert e.text == doc[e.start_char:e.end_char]
    with pytest.raises(CficError):
        GroundingConfig(score_end_margin=-1.0)


@pytest.mark.numerics
def test_options_that_need_the_prior_or_exclude_each_other_are_refused(tiny_loaded):
    import numpy as np

    from cfic import GroundingConfig
    from cfic.attention import AttentionRanker
    from cfic.prior import PriorWeights

    g = Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(10.0, 5.0, 1.0, 0.0)))
    doc = "One sentence here. Another one there. A third."
    with pytest.raises(CficError):
        g.ground("What?", [doc], hops=2, use_prior=False)
    with pytest.raises(CficError):
        g.ground("What?", [doc], score_end_margin=1.0, skip_decoding=False)
    with pytest.raises(CficError):
        GroundingConfig(hops=2)  # no prior
    # a second hop may start in any document: best-first reading is off for it
    assert g.reads_best_first(3) and not Grounder(tiny_loaded, g.config.with_options(hops=2)).reads_best_first(3)
    w = np.zeros((2, 2, 4), dtype=np.float32)
    with pytest.raises(CficError):
        AttentionRanker(w, 0.0, 1.0, null_weights=np.full_like(w, np.nan))
    fitted_at_15 = AttentionRanker(w, 0.0, 1.0, swiftkv_layer=15)
    fitted_at_15.check(2, 4, None)
    fitted_at_15.check(2, 4, 20)
    with pytest.raises(CficError):
        fitted_at_15.check(2, 4, 8)


def _doubling(heads: int, dim: int, layers: tuple[int, ...]) -> QueryUpdate:
    """q + (q I) I = 2 q at ``layers``: the same as doubling those layers' q projection."""
    eye = torch.eye(dim).expand(len(layers), heads, dim, dim).clone()
    return QueryUpdate(layers, eye, eye.clone())


@pytest.mark.numerics
def test_the_update_changes_only_its_layers_attention_as_a_changed_q_projection_would(tiny_loaded):
    grounder, _, window, lengths, ids = _one_window(tiny_loaded)
    cfg = tiny_loaded.model.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    with torch.inference_mode():
        plain = question_pass(grounder.runner, window, ids, 4, segment_lengths=lengths)
        zero = question_pass(grounder.runner, window, ids, 4, segment_lengths=lengths, query_update=QueryUpdate(
            (1,), torch.randn(1, heads, dim, 2), torch.zeros(1, heads, 2, dim)))
        doubled = question_pass(grounder.runner, window, ids, 4, segment_lengths=lengths,
                                query_update=_doubling(heads, dim, (1,)))
    torch.testing.assert_close(zero.attention.last, plain.attention.last)  # b = 0: the heads' own queries
    torch.testing.assert_close(doubled.first, plain.first)  # the layers' outputs are untouched
    torch.testing.assert_close(doubled.attention.last[0], plain.attention.last[0])  # other layers: as before
    assert not torch.allclose(doubled.attention.last[1], plain.attention.last[1], atol=1e-4)
    # the reference: the same pass through a model whose layer-1 q projection is doubled
    model = copy.deepcopy(tiny_loaded.model)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    ref_grounder = Grounder(type(tiny_loaded)(**{**tiny_loaded.__dict__, "model": model}))
    ref_window = ref_grounder.encode([DOC])[0].windows[0]  # layer 1's keys and everything below: unchanged
    with torch.inference_mode():
        ref = question_pass(ref_grounder.runner, ref_window, ids, 4, segment_lengths=lengths)
    torch.testing.assert_close(doubled.attention.last[1], ref.attention.last[1], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(doubled.attention.mean[1], ref.attention.mean[1], atol=2e-4, rtol=1e-3)

"""Baselines of cfic.eval on tiny documents: budgets, seeding, verbatim offsets, the generate output parser."""

from __future__ import annotations

import pytest

from cfic.errors import CficError
from cfic.eval.datasets import Example
from cfic.eval.methods import (
    METHOD_NAMES,
    BM25Method,
    Budget,
    EmbeddingMethod,
    EvalContext,
    FullDocumentMethod,
    RandomMethod,
    clean_generated_line,
    make_methods,
    parse_generated,
    parse_methods,
)
from cfic.eval.metrics import is_verbatim

DOC = (
    "Title: Kitchen\nThe kettle boils water for tea. The oven bakes bread every morning. "
    "A fridge keeps the milk cold.\n\nTitle: Garden\nTomatoes ripen in late summer. "
    "The gardener waters the roses at dawn. Bees visit the lavender all day."
)
EXAMPLE = Example("ex-1", "Which appliance bakes bread?", ("oven",), (DOC,), ())


@pytest.fixture(scope="module")
def ctx(tiny_grounder):
    return EvalContext(grounder=tiny_grounder, seed=7)


def run(method, ctx, example=EXAMPLE, budget=None):
    return method.run(ctx, example, method.prepare(ctx, example.documents), budget or Budget(2))


def test_bm25_picks_the_matching_sentence_within_budget(ctx):
    out = run(BM25Method(), ctx, budget=Budget(1))
    assert [s.text for s in out.spans] == ["The oven bakes bread every morning."]
    out = run(BM25Method(), ctx, budget=Budget(3))
    assert len(out.spans) == 3 and out.sentences == 3
    assert all(is_verbatim(s, EXAMPLE.documents) for s in out.spans)


def test_embedding_ranks_by_meaning(ctx):
    example = Example("ex-2", "Which insects like purple flowers?", ("lavender",), (DOC,), ())
    out = run(EmbeddingMethod(), ctx, example, Budget(1))
    assert [s.text for s in out.spans] == ["Bees visit the lavender all day."]
    assert is_verbatim(out.spans[0], example.documents)


def test_random_is_seeded_and_respects_budget(ctx, tiny_grounder):
    first = run(RandomMethod(), ctx, budget=Budget(3))
    again = run(RandomMethod(), ctx, budget=Budget(3))
    assert first.spans == again.spans and len(first.spans) == 3
    other_seeds = [run(RandomMethod(), EvalContext(grounder=tiny_grounder, seed=s), budget=Budget(3)).spans
                   for s in range(8)]
    assert any(spans != first.spans for spans in other_seeds)
    everything = run(RandomMethod(), ctx, budget=Budget(100))
    assert len(everything.spans) == len(ctx.split(DOC))


def test_full_document_is_the_whole_text(ctx):
    out = run(FullDocumentMethod(), ctx)
    assert [s.text for s in out.spans] == [DOC] and is_verbatim(out.spans[0], [DOC])


def test_baselines_share_cfic_sentence_units(ctx, tiny_grounder):
    assert ctx.split(DOC) == tiny_grounder.split(DOC)
    no_model = EvalContext(model=None)
    no_model._tokenizer = tiny_grounder.tokenizer  # the same tokenizer, without loading any model
    assert no_model.split(DOC) == tiny_grounder.split(DOC)


def test_generate_output_parser_checks_verbatim():
    spans, none = parse_generated("- The oven bakes bread every morning.\n\n\"A fridge keeps the milk cold.\"", [DOC])
    assert not none and [s.text for s in spans] == ["The oven bakes bread every morning.",
                                                    "A fridge keeps the milk cold."]
    assert all(is_verbatim(s, [DOC]) for s in spans)
    spans, none = parse_generated("The oven is used to bake bread.", [DOC])
    assert not none and len(spans) == 1 and not spans[0].located
    assert parse_generated("NO_OUTPUT", [DOC]) == ([], True)
    assert parse_generated("  \n ", [DOC]) == ([], True)
    assert clean_generated_line("  2. 'Tomatoes ripen in late summer.' ") == "Tomatoes ripen in late summer."


def test_method_names_are_validated():
    assert parse_methods(None) == list(METHOD_NAMES)
    assert parse_methods("bm25, random,bm25") == ["bm25", "random"]
    with pytest.raises(CficError, match="unknown method 'tfidf'"):
        parse_methods("bm25,tfidf")
    with pytest.raises(CficError, match="empty"):
        parse_methods(" , ")
    with pytest.raises(CficError, match="unknown method"):
        make_methods(["nope"])


def test_generate_cuts_a_too_long_document_at_whole_sentences(ctx):
    from cfic.eval.methods import GenerateMethod

    lines = [f"Line {i} lists item number {i} of the inventory." for i in range(300)]
    long_doc = "\n".join(lines)
    text, cut = GenerateMethod()._fit(ctx, [long_doc], room=500)
    assert cut and long_doc.startswith(text) and text.endswith("inventory.")
    assert 400 < ctx.count_tokens([text])[0] <= 500
    assert GenerateMethod()._fit(ctx, [DOC], room=500) == (DOC, False)


def test_prior_method_ranks_by_the_fitted_weights_and_cfic_lm_only_skips_the_prior(tiny_loaded):
    from cfic import GroundingConfig
    from cfic.eval.methods import CficMethod, PriorMethod
    from cfic.grounder import Grounder
    from cfic.prior import PriorWeights

    # BM25 only: the sentence that shares the question's words wins
    bm25_only = EvalContext(grounder=Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(0.0, 0.0, 1.0))))
    out = run(PriorMethod(), bm25_only, budget=Budget(1))
    assert [s.text for s in out.spans] == ["The oven bakes bread every morning."]
    # paragraph cosine only: every sentence of the kitchen paragraph ties, the earliest wins
    paragraph_only = EvalContext(grounder=Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(0.0, 1.0, 0.0))))
    out = run(PriorMethod(), paragraph_only, budget=Budget(2))
    assert [s.text for s in out.spans] == ["Title: Kitchen", "The kettle boils water for tea."]
    with pytest.raises(CficError):
        run(PriorMethod(), EvalContext(grounder=Grounder(tiny_loaded)))
    # cfic-lm-only on a grounder with a prior returns what the same grounder without a prior returns
    lm_only = run(CficMethod("cfic-lm-only", True, use_prior=False), bm25_only)
    plain = run(CficMethod("cfic", True), EvalContext(grounder=Grounder(tiny_loaded)))
    assert [(s.start, s.end) for s in lm_only.spans] == [(s.start, s.end) for s in plain.spans]


def test_query_update_row_grounds_with_the_adapters_updated_ranker(tiny_loaded, tmp_path):
    """``cfic-query-update`` grounds with the adapter's ranker that reads learned queries while cfic keeps the
    shipped one (the update is fitted but switched off); ``enabled`` makes cfic itself use it; an adapter without
    one is a clear error."""
    import dataclasses
    import json

    import numpy as np

    from cfic.attention import AttentionRanker
    from cfic.config import GroundingConfig
    from cfic.errors import CficError
    from cfic.eval.methods import make_methods
    from cfic.grounder import Grounder
    from cfic.models import adapter_settings
    from cfic.prior import PriorWeights

    heads = tiny_loaded.model.config.num_attention_heads
    dim = tiny_loaded.model.config.hidden_size // heads
    w = np.random.default_rng(3).normal(size=(2, 2, heads)).astype(np.float32) * 4
    plain = AttentionRanker(w, 0.0, 50.0)
    rng = np.random.default_rng(4)
    updated = plain.with_query_update((0, 1), rng.normal(size=(2, heads, dim, 2)).astype(np.float32) * 2,
                                      rng.normal(size=(2, heads, 2, dim)).astype(np.float32) * 2)
    plain.save(tmp_path / "ranker.safetensors")
    updated.save(tmp_path / "queries.safetensors")
    settings = {"prior": PriorWeights(0.1, 0.1, 0.1, 0.0).to_dict(),
                "attention": {"file": "ranker.safetensors",
                              "query_update": {"file": "queries.safetensors", "enabled": False}}}
    (tmp_path / "cfic.json").write_text(json.dumps(settings))
    loaded = dataclasses.replace(tiny_loaded, adapter=tmp_path)
    shipped = Grounder(loaded, GroundingConfig(**adapter_settings(tmp_path), top_k=1))
    assert shipped.config.attention == plain
    with_update = Grounder(tiny_loaded, shipped.config.with_options(attention=updated),
                           sentence_prior=shipped.sentence_prior)
    (method,) = make_methods(["cfic-query-update"])
    got = [s.text for s in run(method, EvalContext(grounder=shipped)).spans]
    assert got == [e.text for e in with_update.ground(EXAMPLE.question, [DOC], abstain=False).evidence]
    assert got != [e.text for e in shipped.ground(EXAMPLE.question, [DOC], abstain=False).evidence]
    settings["attention"]["query_update"]["enabled"] = True
    (tmp_path / "cfic.json").write_text(json.dumps(settings))
    assert adapter_settings(tmp_path)["attention"] == updated
    with pytest.raises(CficError):
        run(method, EvalContext(grounder=Grounder(tiny_loaded)))

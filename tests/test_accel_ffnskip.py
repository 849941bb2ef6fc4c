"""FFN-SkipLLM-style FFN skipping: the split decoder layer, which columns skip, and the grounder option."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_loaded
from test_accel_layerskip import DOC, QUERY, question_pass, skip_pass_layout

from cfic import CficError, GroundingConfig
from cfic.decoding.layerskip import FFNSkip, layer_hook
from cfic.decoding.runner import KVCache, LayerPass, causal_extension_mask, forward
from cfic.grounder import Grounder

pytestmark = pytest.mark.numerics

LAYERS = 6


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return make_tiny_loaded(tokenizer, layers=LAYERS, seed=5)


def test_the_split_layer_with_every_ffn_column_is_the_decoder_layer(loaded):
    """Attention for all columns, then the FFN for all: the same hidden states and cache as the HF layer itself."""
    g = Grounder(loaded)
    ids = torch.tensor([g.tokenizer(DOC, add_special_tokens=False)["input_ids"][:40]])
    n = ids.shape[1]
    with torch.inference_mode():
        hidden = g.runner.embed(ids)
        rope = g.runner.position_embeddings(hidden, torch.arange(n).unsqueeze(0))
        mask = causal_extension_mask(0, n, torch.device("cpu"))
        caches = [KVCache.empty(g.runner, 1, n) for _ in range(2)]
        for c in caches:
            c.begin(n)
        whole = g.runner.run_layer(1, hidden, rope, caches[0], mask)
        split, cosine = g.runner.run_layer_sparse_ffn(1, LayerPass(hidden, rope, mask, caches[1], 0), torch.arange(n))
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(caches[1].keys[1][:, :, :n], caches[0].keys[1][:, :, :n])
    assert cosine.shape == (n,) and bool(((cosine > -1.01) & (cosine < 1.01)).all())


def test_eligible_columns_skip_and_warmup_tokens_that_see_only_warmup_tokens_do_not_change(loaded):
    """A threshold every column passes: eligible columns skip every FFN block after layer ``first``, so their outputs
    change; a column below the warm-up whose own history is all below the warm-up gets exactly the full model's
    output (attention never sees another hypothesis, and FFN skipping never touches it)."""
    g = Grounder(loaded)
    outs = {}
    for name, schedule in (("full", None), ("skip", FFNSkip(threshold=1e-6, first=1, warmup=3))):
        with torch.inference_mode():
            enc, window, _, cache, shared, starts = question_pass(g)
            mask, rope, _ = skip_pass_layout(enc, window, starts, shared, cache.length, budget=24)
            n = rope.shape[1]
            conts_ids = _packed_ids(enc, window, starts, 24)
            assert len(conts_ids) == n
            cache.ensure_room(n)
            outs[name] = forward(g.runner, torch.tensor([conts_ids]), rope, cache, mask,
                                 layers=layer_hook(g.runner, schedule, rope, shared))
    offsets = rope[0] - shared
    warm = offsets < 3
    assert bool(warm.any()) and bool((~warm).any())
    # (the FFN of a subset of rows is another matmul shape: float rounding only)
    torch.testing.assert_close(outs["skip"][0, warm], outs["full"][0, warm], rtol=1e-4, atol=1e-4)
    assert float((outs["skip"][0, ~warm] - outs["full"][0, ~warm]).abs().max()) > 1e-2


def _packed_ids(enc, window, starts, budget):
    from cfic.decoding.skip import SpanSearch, continuation

    search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, budget, (0,), 0)
    return [t for p, s in starts for t in continuation(p, s, search).tokens]


def test_grounder_with_a_threshold_no_column_reaches_finds_the_full_models_spans(loaded):
    full = Grounder(loaded).ground(QUERY, [DOC])
    never = Grounder(loaded, GroundingConfig(ffn_skip=1.0)).ground(QUERY, [DOC])
    assert [(e.sentence_start, e.sentence_end) for e in never.evidence] == [
        (e.sentence_start, e.sentence_end) for e in full.evidence]
    some = Grounder(loaded, GroundingConfig(ffn_skip=0.5)).ground(QUERY, [DOC])
    assert some.evidence and all(e.text == DOC[e.start_char:e.end_char] for e in some.evidence)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2, True, "0.9"])
def test_bad_ffn_skip_values_are_refused(value):
    with pytest.raises(CficError, match="ffn_skip"):
        GroundingConfig(ffn_skip=value)


def test_ffn_skip_and_layer_skip_exclude_each_other():
    with pytest.raises(CficError, match="exclude"):
        GroundingConfig(ffn_skip=0.9, layer_skip=2)

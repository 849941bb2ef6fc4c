"""SkipDecode-style layer skipping: the schedule, the cache it leaves, and a plain-HF reference."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_loaded
from hypothesis import given, settings
from hypothesis import strategies as st

from cfic import CficError, GroundingConfig
from cfic.decoding.encode import encode_question
from cfic.decoding.layerskip import LayerSkip, check_consistent, layer_hook
from cfic.decoding.prefix import constrained_prefix_search
from cfic.decoding.skip import SpanSearch, candidates, continuation, greedy_span_end, skip_decode_span_end
from cfic.decoding.step import pack
from cfic.decoding.swiftkv import SwiftKV
from cfic.grounder import Grounder

pytestmark = pytest.mark.numerics  # also run under other CPU kernel sets (make test)

DOC = (
    "The river rises in the mountains. The river flows north to the sea. Salmon swim up the river in autumn.\n"
    "Bridges cross it at three towns. A ferry still runs at night. Fishing is allowed in summer only. "
    "The old mill by the river was turned into a museum about the salmon and the ferry."
)
QUERY = "Where does the river flow?"
LAYERS = 6


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return make_tiny_loaded(tokenizer, layers=LAYERS, seed=4)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 8), st.integers(0, 3), st.integers(1, 300), st.lists(st.integers(-20, 400), min_size=1,
                                                                           max_size=40))
def test_schedule_is_monotonic_and_shared_by_position(max_skip, warmup, horizon, offsets):
    layers = 12
    skip = LayerSkip(max_skip, warmup, horizon)
    run = skip.run_matrix(torch.tensor(offsets), layers)
    if run is None:
        assert all(int(s) == 0 for s in skip.skipped(torch.tensor(offsets)))
        return
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    for a, b in zip(order, order[1:], strict=False):  # a later offset runs a subset of an earlier one's layers
        assert not bool((run[:, b] & ~run[:, a]).any())
    for i, o in enumerate(offsets):
        same = [j for j, p in enumerate(offsets) if p == o]
        assert all(torch.equal(run[:, i], run[:, j]) for j in same)  # one schedule per position
        assert bool(run[:warmup, i].all()) and bool(run[-1, i])  # warm-up and top layers always run
        assert int((~run[:, i]).sum()) == int(skip.skipped(torch.tensor([o]))[0]) <= max_skip
        if o <= 0:
            assert bool(run[:, i].all())
    if max(offsets) >= horizon:
        assert int((~run).sum(0).max()) == max_skip


def test_schedule_must_leave_the_top_or_the_swiftkv_layers_alone():
    with pytest.raises(ValueError):
        LayerSkip(5, 1, 10).run_matrix(torch.tensor([10]), 6)
    with pytest.raises(ValueError):
        LayerSkip(2, 1, 10).run_matrix(torch.tensor([10]), 6, limit=2)
    assert LayerSkip(4, 1, 10).run_matrix(torch.tensor([10]), 6) is not None


def skip_pass_layout(enc, window, starts, shared, base, budget):
    """The packed skip pass's tree mask and rotary positions: the decoding package's own packing of the
    continuations ``skip_decode_span_end`` feeds (the code under test, not a copy of it)."""
    search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, budget, (0,), shared)
    step = pack([continuation(p, s, search).branch() for p, s in starts], shared, base, torch.device("cpu"))
    return step.mask, step.rope, base


def question_pass(g: Grounder, layer_skip: LayerSkip | None = None):
    """DOC encoded, then the question and the constrained prefix search of its one window, as ``Grounder`` runs
    them: (encoding, window, question ids, cache, shared length, start candidates). Call inside inference mode."""
    enc = g.encode([DOC])[0]
    window = enc.windows[0]
    q_ids = g.template.query_ids(g.tokenizer, QUERY, g.config.max_query_tokens)
    cache, first = encode_question(g.runner, window, q_ids, room=4096)
    shared = cache.length
    prefixes = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=3, max_steps=64,
                                         layer_skip=layer_skip)
    return enc, window, q_ids, cache, shared, candidates(prefixes)


def test_the_packed_layout_never_reads_skipped_kv(loaded):
    """Hypotheses interleaved in one row: every attended token of the pass ran every layer the reader runs. A
    schedule that grows with the offset (the wrong direction) is caught by the same check."""
    g = Grounder(loaded, GroundingConfig(layer_skip=3, layer_skip_warmup=1))
    with torch.inference_mode():
        enc, window, _, cache, shared, starts = question_pass(g)
    base = cache.length
    mask, rope, base = skip_pass_layout(enc, window, starts, shared, base, budget=12)
    skip = LayerSkip(3, 1, 12)
    run = layer_hook(g.runner, skip, rope, shared).run_matrix
    assert run is not None and not bool(run.all())
    assert check_consistent(run, mask, base)
    wrong = run.flip(1)  # earliest tokens skip most
    assert not check_consistent(wrong, mask, base)


def reference_end_probabilities(g, enc, window, q_ids, start, n_sentences, skip: LayerSkip):
    """One plain pass per boundary, no cache: every layer runs for the whole sequence, but a token keeps its input
    hidden state where the schedule skips the layer. Tokens only read tokens that ran the layer (monotonicity), so
    the outputs a skipping token would have produced are never used."""
    model = g.loaded.model
    core = model.model
    prompt = list(g.template.head_ids)
    for s in range(window.first, window.last):
        prompt.extend(enc.segment_ids[s])
    prompt += q_ids
    answer = list(enc.answer_ids[start])
    out = []
    for j in range(n_sentences):
        if j:
            answer += list(enc.segment_ids[start + j])
        ids = prompt + answer
        with torch.inference_mode():
            x = core.embed_tokens(torch.tensor([ids]))
            n = len(ids)
            rope = core.rotary_emb(x, torch.arange(n).unsqueeze(0))
            run = skip.run_matrix(torch.arange(n) - len(prompt), len(core.layers))
            for i, layer in enumerate(core.layers):
                y = layer(x, attention_mask=None, position_embeddings=rope)
                y = y[0] if isinstance(y, tuple) else y
                x = y if run is None else torch.where(run[i].view(1, n, 1), y, x)
            lp = torch.log_softmax(model.lm_head(core.norm(x))[0, -1].float(), dim=-1)
        out.append(sum(math.exp(float(lp[e])) for e in g.template.eos_ids))
    return out


@pytest.mark.parametrize("finder", [skip_decode_span_end, greedy_span_end])
def test_layer_skipped_span_ends_match_the_reference(loaded, finder):
    budget, max_skip = 24, 3
    g = Grounder(loaded, GroundingConfig(max_span_tokens=budget, max_sentence_tokens=budget))
    skip = LayerSkip(max_skip, 1, budget)
    with torch.inference_mode():
        enc, window, q_ids, cache, shared, starts = question_pass(g, skip)
        search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, budget, g.template.eos_ids, shared)
        ends = finder(g.runner, cache, starts, replace(search, layer_skip=skip))
        plain = finder(g.runner, encode_question(g.runner, window, q_ids, room=4096)[0], starts, search)
    assert any(len(e.end_probabilities) > 1 for e in ends)
    changed = False
    for (_, s), end, full in zip(starts, ends, plain, strict=True):
        ref = reference_end_probabilities(g, enc, window, q_ids, s, len(end.end_probabilities), skip)
        assert list(end.end_probabilities) == pytest.approx(ref, rel=2e-3, abs=1e-12)
        n = min(len(full.end_probabilities), len(end.end_probabilities))
        changed |= list(end.end_probabilities[:n]) != pytest.approx(list(full.end_probabilities[:n]), rel=1e-3)
    assert changed  # skipping layers did change the probabilities: the comparison above is not vacuous


def test_skipped_kv_are_zero_and_earlier_cache_untouched(loaded):
    g = Grounder(loaded, GroundingConfig(max_span_tokens=24, max_sentence_tokens=24))
    skip = LayerSkip(3, 1, 8)
    with torch.inference_mode():
        enc, window, _, cache, shared, starts = question_pass(g)
        before = [k[:, :, : cache.length].clone() for k in cache.keys]
        base = cache.length
        skip_decode_span_end(g.runner, cache, starts, SpanSearch(enc.answer_ids, enc.segment_ids, window.last, 24,
                                                                 g.template.eos_ids, shared, skip))
    _, rope, _ = skip_pass_layout(enc, window, starts, shared, base, budget=24)
    run = layer_hook(g.runner, skip, rope, shared).run_matrix
    for j, (k, old) in enumerate(zip(cache.keys, before, strict=True)):
        assert torch.equal(k[:, :, :base], old)
        new = k[0, :, base: cache.length]  # [heads, n, dim]
        assert bool((new[:, ~run[j]] == 0).all())
        assert bool((new[:, run[j]].abs().sum(-1) > 0).all())


def test_grounder_option_and_swiftkv_combination(loaded):
    fast = Grounder(loaded, GroundingConfig(layer_skip=2, layer_skip_warmup=1, swiftkv_layer=4))
    assert fast.ground(QUERY, [DOC]).evidence
    assert fast.model_key == Grounder(loaded, GroundingConfig(swiftkv_layer=4)).model_key  # decoding-only option
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(layer_skip=3, layer_skip_warmup=1, swiftkv_layer=3))
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(layer_skip=LAYERS - 1, layer_skip_warmup=1))
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(layer_skip=2))  # default warm-up 4 + 2 reaches the top of 6 layers
    with pytest.raises(CficError):
        GroundingConfig(layer_skip=-1)
    # with SwiftKV the skipped band stays below the SwiftKV layer and the packed pass still matches itself
    sw = SwiftKV(loaded.model, 4, 1)
    assert Grounder(loaded, GroundingConfig(layer_skip=2, layer_skip_warmup=1), sw).ground(QUERY, [DOC]).evidence

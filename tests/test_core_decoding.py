"""Decoding against slow references computed with the plain Hugging Face forward (no cache, no packing)."""

from __future__ import annotations

import math

import pytest
import torch

from cfic.decoding.encode import encode_question
from cfic.decoding.prefix import constrained_prefix_search
from cfic.decoding.skip import SpanSearch, candidates, greedy_span_end, skip_decode_span_end

pytestmark = pytest.mark.numerics  # also run under other CPU kernel sets (make test)

DOC = (
    "The river rises in the mountains. The river flows north to the sea. Salmon swim up the river in autumn.\n"
    "Bridges cross it at three towns. The river flows north to the sea. A ferry still runs at night.\n"
    "Fishing is allowed. Fishing is allowed in summer only."
)
QUERY = "Where does the river flow?"


def window_prompt(grounder, enc, window) -> list[int]:
    ids = list(grounder.template.head_ids)
    for s in range(window.first, window.last):
        ids.extend(enc.segment_ids[s])
    return ids


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def encoded(g):
    """(grounder, DOC's encoding, its first window, QUERY's ids): what every decoding test starts from."""
    enc = g.encode([DOC])[0]
    return g, enc, enc.windows[0], g.template.query_ids(g.tokenizer, QUERY, g.config.max_query_tokens)


@pytest.fixture(scope="module")
def setup(tiny_grounder):
    return encoded(tiny_grounder)


def identifying_depth(trie, ids):
    node = trie.ROOT
    for depth, tok in enumerate(ids, 1):
        node = trie.child(node, tok)
        if trie.identified(node) is not None:
            return depth
    return len(ids)


def test_prefix_search_matches_brute_force(setup):
    g, enc, window, q_ids = setup
    prompt = window_prompt(g, enc, window) + q_ids
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=4096)
        found = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=64, max_steps=64)
    by_sentence = {p.sentences[0]: p for p in found}
    distinct = {tuple(ids): s for s, ids in reversed(list(enumerate(enc.answer_ids)))}
    # exhaustive top-k: every distinct sentence is found, with the brute-force average log-probability
    assert set(by_sentence) == set(distinct.values())
    for s, prefix in by_sentence.items():
        ids = list(enc.answer_ids[s])
        d = identifying_depth(window.trie, ids)
        assert list(prefix.tokens) == ids[:d]
        lp = hf_logprobs(g.loaded.model, prompt + ids[:d])
        ref = sum(float(lp[len(prompt) - 1 + i, ids[i]]) for i in range(d)) / d
        assert prefix.score == pytest.approx(ref, abs=2e-4)
    # duplicates ("The river flows north to the sea." twice) come back as one prefix naming both sentences
    dup = [p for p in found if len(p.sentences) > 1]
    assert len(dup) == 1 and len(dup[0].sentences) == 2
    # the best prefix is the brute-force best
    assert found[0].score == pytest.approx(max(p.score for p in found))


def test_top_k_prefixes_are_the_best_k_and_valid(setup):
    g, enc, window, q_ids = setup
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=512)
        top = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=3, max_steps=64)
        cache2, first2 = encode_question(g.runner, window, q_ids, room=4096)
        everything = constrained_prefix_search(g.runner, cache2, first2, window.trie, top_k=64, max_steps=64)
    assert 1 <= len(top) <= 3
    scores = {p.sentences: p.score for p in everything}
    for p in top:  # each returned prefix is a real sentence prefix with its true score
        assert p.score == pytest.approx(scores[p.sentences], abs=1e-4)
        for s in p.sentences:
            assert tuple(enc.answer_ids[s][: len(p.tokens)]) == p.tokens


def reference_end_probabilities(g, enc, window, q_ids, start, n_sentences):
    """Slow reference: one plain forward per boundary."""
    prompt = window_prompt(g, enc, window) + q_ids
    answer = list(enc.answer_ids[start])
    out = []
    for j in range(n_sentences):
        if j:
            answer += list(enc.segment_ids[start + j])
        lp = hf_logprobs(g.loaded.model, prompt + answer)
        out.append(sum(math.exp(float(lp[-1, e])) for e in g.template.eos_ids))
    return out


@pytest.mark.parametrize("finder", [skip_decode_span_end, greedy_span_end])
def test_span_end_matches_reference_loop(setup, finder):
    g, enc, window, q_ids = setup
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=4096)
        shared = cache.length
        # every sentence as a start: prefixes of several tokens exercise the packed history positions
        prefixes = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=64, max_steps=64)
        assert any(len(p.tokens) > 2 for p in prefixes)
        starts = candidates(prefixes)
        ends = finder(g.runner, cache, starts, SpanSearch(enc.answer_ids, enc.segment_ids, window.last, 256,
                                                          g.template.eos_ids, shared))
    assert len(ends) == len(starts)
    for (_, s), end in zip(starts, ends, strict=True):
        assert end.start == s
        ref = reference_end_probabilities(g, enc, window, q_ids, s, len(end.end_probabilities))
        assert list(end.end_probabilities) == pytest.approx(ref, rel=2e-3, abs=1e-12)
        if finder is skip_decode_span_end:
            assert end.end - end.start - 1 == max(range(len(ref)), key=lambda j: (ref[j], -j))
            assert len(ref) == window.last - s  # the whole rest of the (short) document fits the budget


def test_budget_limits_the_span(setup):
    g, enc, window, q_ids = setup
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=4096)
        shared = cache.length
        prefixes = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=3, max_steps=64)
        starts = candidates(prefixes)
        budget = max(len(enc.answer_ids[s]) for _, s in starts) + 3
        search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, budget, g.template.eos_ids, shared)
        ends = skip_decode_span_end(g.runner, cache, starts, search)
    for end in ends:
        used = len(enc.answer_ids[end.start]) + sum(len(enc.segment_ids[s]) for s in range(end.start + 1, end.end))
        assert used <= budget or end.end == end.start + 1

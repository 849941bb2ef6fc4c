"""The sentence trie: every path is a prefix of a document sentence, and identification is exact."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfic.decoding.trie import SentenceTrie

token_seqs = st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(token_seqs, st.integers(0, 10_000))
def test_random_walks_never_leave_the_document(sentences, seed):
    trie = SentenceTrie(sentences, offset=5)
    rng = random.Random(seed)
    node, path = SentenceTrie.ROOT, []
    while True:
        allowed = trie.child_tokens(node).tolist()
        done = trie.identified(node)
        if done is not None or not allowed:
            break
        tok = rng.choice(allowed)
        path.append(tok)
        node = trie.child(node, tok)
    # the walked path is a prefix of at least one sentence, and every sentence through the node has it
    through = trie.nodes[node].sentences
    assert through
    for s in through:
        assert list(sentences[s - 5][: len(path)]) == path
    if done is not None:
        # identified: all sentences through the node are token-identical
        assert len({tuple(sentences[s - 5]) for s in done}) == 1
    else:
        # a dead end can only be the end of a sentence
        assert trie.nodes[node].terminal


@settings(max_examples=200, deadline=None)
@given(token_seqs)
def test_identification_is_the_shortest_unique_prefix(sentences):
    trie = SentenceTrie(sentences)
    for ids in sentences:
        node, found_at = SentenceTrie.ROOT, None
        for depth, tok in enumerate(ids, 1):
            node = trie.child(node, tok)
            if trie.identified(node) is not None:
                found_at = depth
                break
        others = [tuple(o) for o in sentences if tuple(o) != tuple(ids)]
        if found_at is None:
            # never unique: another, longer sentence starts with this whole sentence
            assert any(o[: len(ids)] == tuple(ids) for o in others)
        else:
            assert not any(o[:found_at] == tuple(ids[:found_at]) for o in others)
            assert found_at == 1 or any(o[: found_at - 1] == tuple(ids[: found_at - 1]) for o in others)


def test_duplicates_are_identified_together():
    trie = SentenceTrie([[1, 2, 3], [4, 5], [1, 2, 3]])
    node = trie.child(trie.child(SentenceTrie.ROOT, 1), 2)
    assert trie.identified(trie.child(SentenceTrie.ROOT, 1)) == (0, 2)
    assert trie.identified(node) == (0, 2)


def test_empty_input_is_rejected():
    with pytest.raises(ValueError):
        SentenceTrie([])
    with pytest.raises(ValueError):
        SentenceTrie([[1], []])

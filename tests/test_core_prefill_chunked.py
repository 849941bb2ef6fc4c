"""Chunked prefill (``prefill_chunked``, used by ``read_documents``): a window prefilled in passes that extend one
cache must give the KV cache of a single pass, up to float rounding, for single prompts, right-padded batches,
SwiftKV and whole multi-window documents; and ``cancel`` must stop it between passes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_loaded
from numerics import assert_close_fp

from cfic import GroundingConfig
from cfic.decoding.encode import PREFILL_CHUNK_TOKENS, plan_document, prefill_chunked, read_documents
from cfic.decoding.runner import KVCache, prefill
from cfic.errors import GroundingCancelled
from cfic.grounder import Grounder

pytestmark = pytest.mark.numerics  # also run under other CPU kernel sets (make test)

TEXT = (
    "The river rises in the mountains and flows north to the sea. Salmon swim up the river in autumn. "
    "Bridges cross it at three towns, and a ferry still runs at night. Fishing is allowed in summer only. "
    "The old mill by the second bridge grinds flour for the bakery in the square. "
)


@pytest.fixture(scope="module")
def grounder(tokenizer):
    return Grounder(make_tiny_loaded(tokenizer, layers=2, seed=3))


def ids_of(g: Grounder, n: int, offset: int = 0) -> list[int]:
    ids = g.tokenizer((TEXT * (n // 40 + 2 + offset))[offset * 7:], add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return list(g.template.head_ids) + ids[: n - len(g.template.head_ids)]


def assert_same_cache(actual: KVCache, expected: KVCache, rows: list[int] | None = None) -> None:
    """Same filled length and, for every buffer, the same K and V over each row's real tokens."""
    assert actual.length == expected.length
    lengths = rows or [expected.length] * expected.batch
    for buf in range(len(expected.keys)):
        for r, n in enumerate(lengths):
            assert_close_fp(actual.keys[buf][r, :, :n], expected.keys[buf][r, :, :n])
            assert_close_fp(actual.values[buf][r, :, :n], expected.values[buf][r, :, :n])


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 299, 300, 4096])
def test_chunked_prefill_matches_one_pass(grounder, chunk):
    x = torch.tensor([ids_of(grounder, 300)])
    with torch.inference_mode():
        expected = prefill(grounder.runner, x)
        actual = prefill_chunked(grounder.runner, x, chunk)
    assert actual.capacity == expected.capacity == 300
    assert_same_cache(actual, expected)
    # A defect would not hide in rounding: the last tokens' K/V really depend on the whole prefix.
    with torch.inference_mode():
        other = prefill(grounder.runner, torch.tensor([[x[0, 0].item(), *x[0, 2:].tolist()]]))
    assert (other.keys[1][0, :, -1] - expected.keys[1][0, :, -1]).abs().max() > 1e-2


def test_chunked_prefill_of_a_right_padded_batch_matches_per_row(grounder):
    """Rows of different lengths, right-padded as encode_documents pads them: each row's real tokens must get the
    K/V of a one-pass prefill, whatever the padding after them and however the passes cut them."""
    pad = grounder.template.eos_ids[0]
    rows = [ids_of(grounder, 260), ids_of(grounder, 181, offset=1), ids_of(grounder, 97, offset=2)]
    width = max(map(len, rows))
    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    with torch.inference_mode():
        whole = prefill(grounder.runner, x)
        for chunk in (3, 90, 150):  # 150 // 3 rows = 50 positions per pass
            assert_same_cache(prefill_chunked(grounder.runner, x, chunk), whole, [len(r) for r in rows])
        for r, ids in enumerate(rows):  # and each row alone, unpadded
            alone = prefill(grounder.runner, torch.tensor([ids]))
            batched = whole.slice_row(r, len(ids))
            assert_same_cache(batched, alone)


def test_chunked_prefill_with_swiftkv(tokenizer):
    """With SwiftKV the upper layers write only K/V for the document; the chunked passes must do the same."""
    g = Grounder(make_tiny_loaded(tokenizer, layers=4, seed=1), GroundingConfig(swiftkv_layer=2, swiftkv_group=2))
    x = torch.tensor([ids_of(g, 240)])
    with torch.inference_mode():
        expected = prefill(g.runner, x)
        actual = prefill_chunked(g.runner, x, 50)
    assert len(expected.keys) == 3  # two own buffers below the SwiftKV layer, one shared by layers 2 and 3
    assert_same_cache(actual, expected)


def encode_documents(runner, tokenizer, template, documents, config, max_context, model_key, cancel=None,
                     chunk_tokens=PREFILL_CHUNK_TOKENS):
    """``(id, text, metadata)`` documents planned and read, as ``Grounder.encode`` does."""
    plans = [plan_document(tokenizer, template, t, i, m, config, max_context) for i, t, m in documents]
    return read_documents(runner, template, plans, config, model_key, cancel=cancel, chunk_tokens=chunk_tokens)


def test_encode_documents_in_chunks_gives_the_same_windows(grounder):
    """Whole documents through encode_documents: several windows per document, windows of similar length batched
    together, every window prefilled in passes of 16 tokens vs. in one pass."""
    config = GroundingConfig(max_span_tokens=32, max_sentence_tokens=32, max_query_tokens=16, max_prefix_tokens=8,
                             encode_batch_tokens=1024, max_context_tokens=300)
    g = Grounder(grounder.loaded, config)
    docs = [("long", TEXT * 6, {}), ("short", TEXT, {"k": 1}), ("mid", TEXT * 2, {})]
    args = (g.runner, g.tokenizer, g.template, docs, g.config, g.max_context, g.model_key)
    one_pass = encode_documents(*args, chunk_tokens=10**9)
    chunked = encode_documents(*args, chunk_tokens=16)
    assert len(one_pass[0].windows) > 1, "the long document must need several windows"
    for a, b in zip(chunked, one_pass, strict=True):
        assert [(w.first, w.last, w.n_tokens) for w in a.windows] == [(w.first, w.last, w.n_tokens) for w in b.windows]
        for wa, wb in zip(a.windows, b.windows, strict=True):
            assert wa.kv.length == wa.n_tokens
            assert_same_cache(wa.kv, wb.kv)
    # The answers built on the chunked encodings are the same as well.
    query = "Where do salmon swim in autumn?"
    r1 = g.ground(query, chunked, use_prior=False, abstain=False)
    r2 = g.ground(query, one_pass, use_prior=False, abstain=False)
    assert [(e.document_index, e.start_char, e.end_char) for e in r1.evidence] == \
        [(e.document_index, e.start_char, e.end_char) for e in r2.evidence]
    for e1, e2 in zip(r1.evidence, r2.evidence, strict=True):
        assert e1.score == pytest.approx(e2.score, rel=1e-4, abs=1e-6)


def test_cancel_stops_a_long_window_between_passes(grounder):
    """One window, many passes: cancel is asked between them, and once it says yes no further pass runs."""
    x = torch.tensor([ids_of(grounder, 400)])
    passes = []
    hook = grounder.runner.layers[0].register_forward_pre_hook(lambda module, args, kwargs: passes.append(1),
                                                               with_kwargs=True)
    asked = []

    def cancel() -> bool:
        asked.append(len(passes))
        return len(asked) >= 3

    try:
        with torch.inference_mode(), pytest.raises(GroundingCancelled):
            prefill_chunked(grounder.runner, x, 50, cancel)
    finally:
        hook.remove()
    assert asked == [1, 2, 3]  # asked after the 1st, 2nd and 3rd of the 8 passes
    assert len(passes) == 3


def test_encode_documents_asks_cancel_inside_a_window(grounder):
    """A single window of 400 tokens: before chunking, cancel was only asked before the one batch."""
    g = grounder
    config = GroundingConfig(max_span_tokens=32, max_sentence_tokens=32, max_query_tokens=16, max_prefix_tokens=8)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1  # let the batch start, then stop at the first check inside the window

    with pytest.raises(GroundingCancelled):
        encode_documents(g.runner, g.tokenizer, g.template, [("d", TEXT * 4, {})], config, 2048, g.model_key,
                         cancel=cancel, chunk_tokens=64)
    assert len(calls) == 2


def test_default_chunk_size_is_in_the_documented_range():
    assert 256 <= PREFILL_CHUNK_TOKENS <= 1024
    with pytest.raises(ValueError):
        prefill_chunked(None, torch.zeros(1, 4, dtype=torch.long), 0)

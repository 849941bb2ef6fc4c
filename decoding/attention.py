"""Question-to-sentence attention: how much each head, at each layer, looks at each sentence while reading the
question (QRHead / ICR style retrieval heads).

The question pass already runs the question after the cached document; every head's attention from the question
tokens over the document's tokens is a relevance signal the LM computes anyway. ``SentenceAttentionTap`` is a
layer hook for that pass: before a layer runs it recomputes the layer's queries for the columns still running (a
small projection: the question's few tokens), lets the layer run as usual (which writes this pass's keys into the
cache), then takes the softmax of the queries against every key the layer attends to and sums it over each
sentence's tokens. The layer's own output is untouched, so the pass gives the same evidence with or without the
tap. Any attention implementation works (SDPA, eager, flash): the weights are recomputed here, never read back.

With SwiftKV the layers from the SwiftKV layer on run for the question's last token only, so there the mean over
the question's tokens is that token's row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cfic.decoding.runner import PLAIN, LayerHook, LayerPass, LayerRunner


@dataclass(frozen=True)
class SentenceAttention:
    """Attention mass on each sentence of one window, from the question pass.

    ``last``: from the question's last token (the one that predicts the first evidence token), ``mean``: averaged
    over the question tokens that ran the layer; both ``[layers, heads, sentences]`` float32. ``tokens``: each
    sentence's token count (longer sentences collect more mass)."""

    last: Tensor
    mean: Tensor
    tokens: Tensor

    @property
    def num_sentences(self) -> int:
        return int(self.tokens.numel())


def sentence_token_bounds(head_tokens: int, segment_lengths: list[int]) -> Tensor:
    """Cache positions where each sentence's tokens start, and where the last one ends (``[sentences + 1]``)."""
    bounds = torch.tensor([0, *segment_lengths], dtype=torch.long).cumsum(0) + head_tokens
    return bounds


def sentence_attention_masses(query: Tensor, keys: Tensor, bounds: Tensor, scale: float, mask: Tensor | None = None
                              ) -> Tensor:
    """Each head's attention from each query row summed over each sentence's keys: ``[heads, rows, sentences]``.

    ``query`` ``[heads, rows, dim]`` (rotated), ``keys`` ``[kv_heads, keys, dim]`` (the cache's, grouped-query
    layout), ``bounds`` from :func:`sentence_token_bounds`, ``mask`` the pass's boolean ``[1, 1, rows, keys]``
    attention mask. Differentiable in ``query`` (the query update is trained through it)."""
    heads, rows = query.shape[0], query.shape[1]
    kv_heads = keys.shape[0]
    # Grouped query attention without copying the keys per head: head h reads kv head h // (heads / kv_heads),
    # so each kv head's query heads are stacked as rows of one matrix product.
    grouped = query.float().reshape(kv_heads, heads // kv_heads * rows, -1)
    scores = (grouped @ keys.float().transpose(-1, -2)).view(heads, rows, -1) * scale  # [heads, rows, keys]
    if mask is not None:
        scores = scores.masked_fill(~mask[0, :, :rows, : scores.shape[-1]], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    cumulative = torch.nn.functional.pad(probs.cumsum(-1), (1, 0))
    return cumulative[..., bounds[1:]] - cumulative[..., bounds[:-1]]


@dataclass(frozen=True, eq=False)  # tensors: no field-wise equality (the ranker holding it compares by digest)
class QueryUpdate:
    """A learned low-rank change of some layers' rotated queries, for the tap's attention only: ``q + (q a) b`` per
    head. Why: the heads' attention as the LM computes it ranks NQ's evidence no better than the prior (issue 29,
    rounds 6-9); queries trained for ranking on the training side do (round 11). The layer's own output is
    untouched, so the evidence's text and the LM's predictions stay the model's. ``a``: ``[layers, heads, dim,
    rank]``, ``b``: ``[layers, heads, rank, dim]`` (float32), row ``i`` for model layer ``layers[i]``."""

    layers: tuple[int, ...]
    a: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        n = len(self.layers)
        if self.a.ndim != 4 or self.b.ndim != 4 or self.a.shape[0] != n or self.b.shape[0] != n \
                or self.a.shape[1] != self.b.shape[1] or self.a.shape[3] != self.b.shape[2] \
                or self.a.shape[2] != self.b.shape[3]:
            raise ValueError(f"query update shapes {tuple(self.a.shape)} / {tuple(self.b.shape)} do not fit "
                             f"{n} layers")
        if len(set(self.layers)) != n:
            raise ValueError(f"query update layers repeat: {self.layers}")

    def apply(self, index: int, query: Tensor) -> Tensor:
        """``query`` ``[1, heads, rows, dim]`` of model layer ``index``, updated if it is one of ``layers``."""
        if index not in self.layers:
            return query
        i = self.layers.index(index)
        a, b = self.a[i].to(query.device), self.b[i].to(query.device)
        q = query.float()
        return q + torch.einsum("bhtr,hrd->bhtd", torch.einsum("bhtd,hdr->bhtr", q, a), b)


@dataclass
class SentenceAttentionTap:
    """A :class:`~cfic.decoding.runner.LayerHook` that records :class:`SentenceAttention` while running every layer
    plainly. One tap per question pass (``bounds`` from :func:`sentence_token_bounds`); read ``result()`` after.
    ``query_update``: the ranker's learned change of some layers' queries (the attention it records, not the layer)."""

    bounds: Tensor
    inner: LayerHook = PLAIN
    query_update: QueryUpdate | None = None
    _last: list[Tensor] = field(default_factory=list, repr=False)
    _mean: list[Tensor] = field(default_factory=list, repr=False)

    def begin(self, runner: LayerRunner, state: LayerPass, start: int) -> None:
        if start == 0:  # a pass resumed at a middle layer (the answerability probe's split) keeps what it has
            self._last.clear()
            self._mean.clear()
        self.inner.begin(runner, state, start)

    def run(self, runner: LayerRunner, index: int, state: LayerPass) -> Tensor:
        query = _queries(runner, index, state)
        if self.query_update is not None:
            query = self.query_update.apply(index, query)
        cache, mask = state.cache, state.mask
        out = self.inner.run(runner, index, state)
        assert cache is not None, "the question pass always has a cache"
        slot = cache.slot(index)
        keys = cache.keys[slot][0, :, : cache.length + cache.pending].float()  # [kv_heads, keys, head_dim]
        scale = getattr(runner.layers[index].self_attn, "scaling", query.shape[-1] ** -0.5)
        per_sentence = sentence_attention_masses(query[0], keys, self.bounds, scale, mask)
        self._last.append(per_sentence[:, -1])
        self._mean.append(per_sentence.mean(1))
        return out

    def result(self) -> SentenceAttention:
        if not self._last:
            raise RuntimeError("the attention tap has not run")
        return SentenceAttention(torch.stack(self._last), torch.stack(self._mean),
                                 (self.bounds[1:] - self.bounds[:-1]).float())


def _queries(runner: LayerRunner, index: int, state: LayerPass) -> Tensor:
    """The layer's rotated queries ``[1, heads, rows, head_dim]`` for the columns running, as its modeling file
    computes them (input norm, q projection, optional q norm, rotary)."""
    layer = runner.layers[index]
    attn = layer.self_attn
    x = layer.input_layernorm(state.hidden)
    b, n, _ = x.shape
    head_dim = getattr(attn, "head_dim", runner.head_dim)
    q = attn.q_proj(x).view(b, n, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = state.rope
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return rotate(q, q[:, :0], cos, sin)[0]

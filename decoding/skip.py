"""Skip Decoding (CFIC): choose where the evidence ends without generating it.

For each start sentence, the text that would follow — the rest of the sentence, then the next sentences as they
stand in the document, up to the budget — is teacher-forced in one pass for all candidates at once (packed into
one ``decode_step``). The model's end-of-evidence probability after each sentence's last token scores that
sentence boundary; the span ends at the argmax. ``greedy_span_end`` is the slow path Skip Decoding replaces (token
by token, stop at the first boundary where ending beats continuing) and exists for the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cfic.decoding.layerskip import FFNSkip, LayerSkip
from cfic.decoding.prefix import Prefix
from cfic.decoding.runner import KVCache, LayerRunner
from cfic.decoding.step import Branch, decode_step


@dataclass(frozen=True)
class SpanEnd:
    """Evidence = sentences ``[start, end)``; ``end_probabilities[j]`` is P(end) after sentence ``start + j``."""

    start: int
    end: int
    end_probabilities: tuple[float, ...]

    @property
    def end_probability(self) -> float:
        return self.end_probabilities[self.end - self.start - 1]


@dataclass(frozen=True)
class SpanSearch:
    """What a span-end search knows about one window after one question: the document's tokens (``answer_ids``:
    each sentence as an answer starts it; ``segment_ids``: as it continues the previous one), the window's end
    (exclusive: a span never crosses it), the token ``budget``, the end-of-evidence ids, ``shared`` (the cache
    length of document + question, the context every candidate sees) and an optional layer/FFN skipping schedule."""

    answer_ids: Sequence[Sequence[int]]
    segment_ids: Sequence[Sequence[int]]
    last_sentence: int
    budget: int
    eos_ids: tuple[int, ...]
    shared: int
    layer_skip: LayerSkip | FFNSkip | None = None


@dataclass(frozen=True)
class Continuation:
    """The text that would follow ``prefix`` as the start of sentence ``start``: its unfed tokens, then the next
    sentences as they stand, within the budget."""

    prefix: Prefix
    start: int
    tokens: list[int]  # starts with the prefix's first unfed token
    boundaries: list[int]  # index in ``tokens`` of each sentence's last token

    def branch(self) -> Branch:
        """The whole continuation as one branch of a packed step."""
        return Branch(self.prefix.positions, self.tokens)


def continuation(prefix: Prefix, start: int, search: SpanSearch) -> Continuation:
    first = list(search.answer_ids[start])
    tokens = first[len(prefix.positions):]
    boundaries = [len(tokens) - 1]
    used = len(first)
    for s in range(start + 1, search.last_sentence):
        seg = search.segment_ids[s]
        if used + len(seg) > search.budget:
            break
        tokens.extend(seg)
        used += len(seg)
        boundaries.append(len(tokens) - 1)
    return Continuation(prefix, start, tokens, boundaries)


def candidates(prefixes: Sequence[Prefix]) -> list[tuple[Prefix, int]]:
    """(prefix, start sentence) pairs; a prefix that identifies identical duplicates yields one per occurrence."""
    return [(p, s) for p in prefixes for s in (p.sentences or ())]


def skip_decode_span_end(runner: LayerRunner, cache: KVCache, starts: Sequence[tuple[Prefix, int]],
                         search: SpanSearch) -> list[SpanEnd]:
    """One batched teacher-forced pass; returns one ``SpanEnd`` per start, in order.

    Only the sentence-end tokens' outputs are read, so with SwiftKV the upper layers run for those tokens only."""
    if not starts:
        return []
    conts = [continuation(p, s, search) for p, s in starts]
    rows, offset = [], 0
    for c in conts:
        rows.extend(offset + b for b in c.boundaries)
        offset += len(c.tokens)
    hidden, _ = decode_step(runner, cache, [c.branch() for c in conts], search.shared,
                            search.layer_skip, outputs=rows)
    probs = torch.softmax(runner.logits(hidden), dim=-1)[:, list(search.eos_ids)].sum(-1).tolist()
    out, k = [], 0
    for c in conts:
        p_end = tuple(probs[k: k + len(c.boundaries)])
        k += len(c.boundaries)
        best = max(range(len(p_end)), key=lambda j: (p_end[j], -j))
        out.append(SpanEnd(c.start, c.start + best + 1, p_end))
    return out


def score_span_end(starts: Sequence[tuple[Prefix, int]], search: SpanSearch, log_scores: torch.Tensor,
                   margin: float) -> list[SpanEnd]:
    """The span end without a forward pass: from its start sentence the span takes the following sentences (inside
    the window and the budget) while each scores within ``margin`` of the start by ``log_scores`` — the search's own
    per-sentence log scores (the prior fused with the question pass's attention), indexed by document sentence.
    ``end_probabilities`` are the sentences' scores relative to the start, ``exp(min(0, score - start score))``: a
    stand-in for P(end), which this path never computes. Why: the teacher-forced pass is ~80% of a warm question;
    this costs nothing, and ``cfic evaluate`` compares the two (``cfic-score-end``)."""
    out = []
    for _, start in starts:
        top = float(log_scores[start])
        used, end, rel = len(search.answer_ids[start]), start + 1, [1.0]
        while end < search.last_sentence:
            seg = len(search.segment_ids[end])
            score = float(log_scores[end])
            if used + seg > search.budget or score < top - margin:
                break
            used += seg
            rel.append(float(torch.tensor(min(0.0, score - top)).exp()))
            end += 1
        out.append(SpanEnd(start, end, tuple(rel)))
    return out


def greedy_span_end(runner: LayerRunner, cache: KVCache, starts: Sequence[tuple[Prefix, int]],
                    search: SpanSearch) -> list[SpanEnd]:
    """The path Skip Decoding replaces: decode token by token under the document constraint (the only allowed
    tokens are the document's next token, or end-of-evidence at a sentence boundary); stop at the first boundary
    where P(end) beats P(next token), or at the budget. One forward per token, all candidates packed per step."""
    if not starts:
        return []
    conts = [continuation(p, s, search) for p, s in starts]
    histories = [list(c.prefix.positions) for c in conts]
    boundary_sets = [set(c.boundaries) for c in conts]
    probs: list[list[float]] = [[] for _ in conts]
    ended = [False] * len(conts)
    step = 0
    while True:
        live = [i for i, c in enumerate(conts) if not ended[i] and step < len(c.tokens)]
        if not live:
            break
        branches = [Branch(histories[i], conts[i].tokens[step:step + 1]) for i in live]
        hidden, fed = decode_step(runner, cache, branches, search.shared, search.layer_skip)
        logprobs = torch.log_softmax(runner.logits(hidden), dim=-1)
        for j, i in enumerate(live):
            histories[i].extend(fed[j])
            if step in boundary_sets[i]:
                p_end = float(logprobs[j, list(search.eos_ids)].exp().sum())
                probs[i].append(p_end)
                nxt = conts[i].tokens[step + 1] if step + 1 < len(conts[i].tokens) else None
                if nxt is None or p_end >= float(logprobs[j, nxt].exp()):
                    ended[i] = True
        step += 1
    return [SpanEnd(c.start, c.start + len(p), tuple(p)) for c, p in zip(conts, probs, strict=True)]

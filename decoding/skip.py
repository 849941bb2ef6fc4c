"""Skip Decoding (CFIC): choose where the evidence ends without generating it.

For each start sentence, the text that would follow — the rest of the sentence, then the next sentences as they
stand in the document, up to the budget — is teacher-forced in one pass for all candidates at once (packed into
one row with a tree mask). The model's end-of-evidence probability after each sentence's last token scores that
sentence boundary; the span ends at the argmax. ``greedy_span_end`` is the slow path Skip Decoding replaces (token
by token, stop at the first boundary where ending beats continuing) and exists for the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cfic.decoding.layerskip import FFNSkip, LayerSkip, skip_args
from cfic.decoding.prefix import Prefix
from cfic.decoding.runner import KVCache, LayerRunner, TreeMask, forward


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
class _Continuation:
    prefix: Prefix
    start: int
    tokens: list[int]  # starts with the prefix's first unfed token
    boundaries: list[int]  # index in ``tokens`` of each sentence's last token


def _continuation(prefix: Prefix, start: int, answer_ids: Sequence[Sequence[int]],
                  segment_ids: Sequence[Sequence[int]], last: int, budget: int) -> _Continuation:
    first = list(answer_ids[start])
    tokens = first[len(prefix.positions):]
    boundaries = [len(tokens) - 1]
    used = len(first)
    for s in range(start + 1, last):
        seg = segment_ids[s]
        if used + len(seg) > budget:
            break
        tokens.extend(seg)
        used += len(seg)
        boundaries.append(len(tokens) - 1)
    return _Continuation(prefix, start, tokens, boundaries)


def candidates(prefixes: Sequence[Prefix]) -> list[tuple[Prefix, int]]:
    """(prefix, start sentence) pairs; a prefix that identifies identical duplicates yields one per occurrence."""
    return [(p, s) for p in prefixes for s in (p.sentences or ())]


def skip_decode_span_end(
    runner: LayerRunner,
    cache: KVCache,
    starts: Sequence[tuple[Prefix, int]],
    answer_ids: Sequence[Sequence[int]],
    segment_ids: Sequence[Sequence[int]],
    last_sentence: int,
    budget: int,
    eos_ids: tuple[int, ...],
    shared: int,
    layer_skip: LayerSkip | FFNSkip | None = None,
) -> list[SpanEnd]:
    """One batched teacher-forced pass; returns one ``SpanEnd`` per start, in order.

    ``shared``: cache length of document + question (the context every candidate sees). ``last_sentence``: the
    window's end (exclusive) — a span never crosses it. Only the sentence-end tokens' outputs are read, so with
    SwiftKV the upper layers run for those tokens only; ``layer_skip`` applies a SkipDecode schedule.
    """
    if not starts:
        return []
    conts = [_continuation(p, s, answer_ids, segment_ids, last_sentence, budget) for p, s in starts]
    total = sum(len(c.tokens) for c in conts)
    cache.ensure_room(total)
    base = cache.length
    histories, new_positions, ids, rope = [], [], [], []
    at = base
    for c in conts:
        n = len(c.tokens)
        histories.append(list(c.prefix.positions))
        new_positions.append(list(range(at, at + n)))
        ids.extend(c.tokens)
        first_pos = shared + len(c.prefix.positions)
        rope.extend(range(first_pos, first_pos + n))
        at += n
    mask = TreeMask(shared).build(histories, new_positions, base + total, runner.device)
    dev = runner.device
    rows, offset = [], 0
    for c in conts:
        rows.extend(offset + b for b in c.boundaries)
        offset += len(c.tokens)
    rope_t = torch.tensor([rope], device=dev)
    hidden = forward(runner, torch.tensor([ids], device=dev), rope_t, cache, mask,
                     outputs=torch.tensor(rows, dtype=torch.long, device=dev),
                     **skip_args(runner, layer_skip, rope_t, shared))
    probs = torch.softmax(runner.logits(hidden[0]), dim=-1)[:, list(eos_ids)].sum(-1).tolist()
    out, k = [], 0
    for c in conts:
        p_end = tuple(probs[k: k + len(c.boundaries)])
        k += len(c.boundaries)
        best = max(range(len(p_end)), key=lambda j: (p_end[j], -j))
        out.append(SpanEnd(c.start, c.start + best + 1, p_end))
    return out


def greedy_span_end(
    runner: LayerRunner,
    cache: KVCache,
    starts: Sequence[tuple[Prefix, int]],
    answer_ids: Sequence[Sequence[int]],
    segment_ids: Sequence[Sequence[int]],
    last_sentence: int,
    budget: int,
    eos_ids: tuple[int, ...],
    shared: int,
    layer_skip: LayerSkip | FFNSkip | None = None,
) -> list[SpanEnd]:
    """The path Skip Decoding replaces: decode token by token under the document constraint (the only allowed
    tokens are the document's next token, or end-of-evidence at a sentence boundary); stop at the first boundary
    where P(end) beats P(next token), or at the budget. One forward per token, all candidates packed per step."""
    if not starts:
        return []
    conts = [_continuation(p, s, answer_ids, segment_ids, last_sentence, budget) for p, s in starts]
    histories = [list(c.prefix.positions) for c in conts]
    boundary_sets = [set(c.boundaries) for c in conts]
    probs: list[list[float]] = [[] for _ in conts]
    ended = [False] * len(conts)
    masks = TreeMask(shared)
    step = 0
    while True:
        live = [i for i, c in enumerate(conts) if not ended[i] and step < len(c.tokens)]
        if not live:
            break
        cache.ensure_room(len(live))
        base = cache.length
        new_positions = [[base + j] for j in range(len(live))]
        mask = masks.build([histories[i] for i in live], new_positions, base + len(live), runner.device)
        ids = torch.tensor([[conts[i].tokens[step] for i in live]], device=runner.device)
        rope = torch.tensor([[shared + len(conts[i].prefix.positions) + step for i in live]], device=runner.device)
        hidden = forward(runner, ids, rope, cache, mask, **skip_args(runner, layer_skip, rope, shared))
        logprobs = torch.log_softmax(runner.logits(hidden[0]), dim=-1)
        for j, i in enumerate(live):
            histories[i].append(base + j)
            if step in boundary_sets[i]:
                p_end = float(logprobs[j, list(eos_ids)].exp().sum())
                probs[i].append(p_end)
                nxt = conts[i].tokens[step + 1] if step + 1 < len(conts[i].tokens) else None
                if nxt is None or p_end >= float(logprobs[j, nxt].exp()):
                    ended[i] = True
        step += 1
    return [SpanEnd(c.start, c.start + len(p), tuple(p)) for c, p in zip(conts, probs, strict=True)]

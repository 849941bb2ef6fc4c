"""One decoding step for hypotheses packed after a shared context: the step both searches take.

The prefix search feeds each live prefix's newest token, skip decoding feeds each candidate's whole continuation,
the greedy ablation one token per candidate per step: all are a set of *branches* -- a hypothesis's own earlier cache
positions, the tokens it adds now, and the rotary position of the first of them -- packed into one row after the
shared document + question, with a tree mask so no branch sees another. Forking a hypothesis never copies the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cfic.decoding.layerskip import FFNSkip, LayerSkip, layer_hook
from cfic.decoding.runner import KVCache, LayerRunner, TreeMask, forward


@dataclass(frozen=True)
class Branch:
    """``history``: cache positions this hypothesis already owns (after the shared context); ``tokens``: what it
    feeds now. Its tokens continue its own history, so the first sits at rotary position ``shared + len(history)``
    (the rest follow consecutively) wherever the cache put the history."""

    history: Sequence[int]
    tokens: Sequence[int]


@dataclass(frozen=True)
class PackedStep:
    """The branches as one row: token ids and rotary positions ``[1, n]``, the tree mask, and each branch's new
    cache positions (``base`` = the cache length before the step)."""

    ids: Tensor
    rope: Tensor
    mask: Tensor
    new_positions: list[list[int]]


def pack(branches: Sequence[Branch], shared: int, base: int, device: torch.device) -> PackedStep:
    """Lay ``branches`` out branch by branch from cache position ``base``."""
    ids: list[int] = []
    rope: list[int] = []
    new_positions: list[list[int]] = []
    at = base
    for b in branches:
        n, first = len(b.tokens), shared + len(b.history)
        ids.extend(b.tokens)
        rope.extend(range(first, first + n))
        new_positions.append(list(range(at, at + n)))
        at += n
    mask = TreeMask(shared).build([list(b.history) for b in branches], new_positions, at, device)
    return PackedStep(torch.tensor([ids], dtype=torch.long, device=device),
                      torch.tensor([rope], dtype=torch.long, device=device), mask, new_positions)


def decode_step(
    runner: LayerRunner,
    cache: KVCache,
    branches: Sequence[Branch],
    shared: int,
    schedule: LayerSkip | FFNSkip | None = None,
    outputs: Sequence[int] | None = None,
) -> tuple[Tensor, list[list[int]]]:
    """Feed every branch's tokens in one pass (appended to ``cache``, which grows as needed).

    Returns the final hidden states ``[n or len(outputs), hidden]`` (before the final norm; ``outputs``: the
    packed columns to return -- with SwiftKV the upper layers run for those alone) and each branch's new cache
    positions. ``schedule``: SkipDecode or FFN skipping by answer offset (rotary position - ``shared``)."""
    cache.ensure_room(sum(len(b.tokens) for b in branches))
    step = pack(branches, shared, cache.length, runner.device)
    columns = None if outputs is None else torch.tensor(list(outputs), dtype=torch.long, device=runner.device)
    hidden = forward(runner, step.ids, step.rope, cache, step.mask, outputs=columns,
                     layers=layer_hook(runner, schedule, step.rope, shared))
    return hidden[0], step.new_positions

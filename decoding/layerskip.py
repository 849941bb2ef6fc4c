"""SkipDecode-style layer skipping (arXiv 2307.02628) and FFN-SkipLLM-style FFN skipping (arXiv 2404.03865) for the
tokens cfic decodes or teacher-forces.

Every answer token has an *offset*: its position counted from the first answer token (the prefix-search tokens and
the skip-decoding continuation tokens; the document and the question have negative offsets and run every layer).
The schedule skips a band of lower layers ``[warmup, warmup + skipped(offset))`` whose width grows linearly with the
offset, from 0 at offset 0 to ``max_skip`` at ``horizon`` (the skip-decoding budget by default): one exit schedule
per position, shared by every hypothesis in the batch, and the set of layers a token runs never grows with its
offset.

Why the cache stays consistent: a token only attends to the shared prefix (every layer ran) and to earlier tokens of
its own hypothesis, whose offsets are smaller, so by monotonicity they ran every layer it runs: whenever it reads
K/V of layer ``j``, those K/V were computed. In cfic's packed layout hypotheses are interleaved in one row, but the
tree mask never lets a token see another hypothesis's tokens, and tokens at the same offset share the schedule
whatever their place in the row. ``SkippedLayers`` writes zeros as the K/V of a skipped (token, layer) pair; they sit
only under masked-out entries. ``check_consistent`` verifies the property for a concrete mask (used by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cfic.decoding.runner import PLAIN, LayerHook, LayerPass, causal_extension_mask


@dataclass(frozen=True)
class LayerSkip:
    """``max_skip`` layers above the first ``warmup`` are skipped at offsets ``>= horizon``; fewer before."""

    max_skip: int
    warmup: int = 1
    horizon: int = 256

    def __post_init__(self) -> None:
        if self.max_skip < 0 or self.warmup < 0 or self.horizon < 1:
            raise ValueError("layer skip: max_skip and warmup must be >= 0 and horizon >= 1")

    def skipped(self, offsets: Tensor) -> Tensor:
        """Layers skipped at each offset: ``floor(max_skip * min(offset, horizon) / horizon)``, 0 for offsets < 0."""
        return (offsets.clamp(0, self.horizon) * self.max_skip) // self.horizon

    def run_matrix(self, offsets: Tensor, num_layers: int, limit: int | None = None) -> Tensor | None:
        """Boolean ``[num_layers, n]``: which layers each token runs (None when nothing is skipped).

        ``limit``: the skipped band must end at or below this layer (the SwiftKV layer; by default the top layer
        always runs)."""
        limit = num_layers - 1 if limit is None else limit
        if self.warmup + self.max_skip > limit:
            raise ValueError(f"layer skip: warmup {self.warmup} + max_skip {self.max_skip} layers must stay below "
                             f"layer {limit}")
        skipped = self.skipped(offsets.to(torch.long).cpu())
        if not bool((skipped > 0).any()):
            return None
        layer = torch.arange(num_layers).unsqueeze(1)
        return ~((layer >= self.warmup) & (layer < self.warmup + skipped.unsqueeze(0)))


def check_consistent(run: Tensor, mask: Tensor, past: int) -> bool:
    """True when no token reads K/V that were never computed: for every token ``r`` of the pass and every token
    ``c`` of the same pass it attends to (``mask[r, past + c]``), ``c`` ran every layer ``r`` runs. (Tokens before
    ``past`` are assumed complete.)"""
    m = mask.reshape(mask.shape[-2], mask.shape[-1])[:, past:].to(torch.bool).cpu()
    run = run.cpu()
    # missing[r, c] = some layer j with run[j, r] and not run[j, c]
    missing = (run.t().unsqueeze(1) & ~run.t().unsqueeze(0)).any(-1)
    return not bool((m & missing).any())


@dataclass(frozen=True)
class FFNSkip:
    """FFN-SkipLLM: attention always runs (the K/V stay complete); an answer token whose FFN block barely changed
    its hidden state (cosine of the block's input and output >= ``threshold``) skips the FFN blocks of the layers
    that follow, up to the SwiftKV layer (or the last layer, which always runs). The FFN always runs below layer
    ``first`` and for the first ``warmup`` answer tokens (offsets), as in the paper's warm-up."""

    threshold: float = 0.99
    first: int = 2
    warmup: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0 or self.first < 0 or self.warmup < 0:
            raise ValueError("FFN skip: threshold must lie in (0, 1], first and warmup must be >= 0")

    def last(self, runner) -> int:
        """The layer (exclusive) below which FFN blocks may be skipped."""
        return runner.swiftkv.layer if runner.swiftkv is not None else runner.num_layers - 1


class SkippedLayers:
    """SkipDecode for one pass: column ``c`` runs layer ``j`` only where ``run[j, c]``; a skipped layer leaves the
    hidden state unchanged and writes zeros as that column's K/V there (finite, and never read: see the module
    docstring)."""

    def __init__(self, run: Tensor, device: torch.device):
        self.run_matrix = run
        self.rows: list[Tensor | None] = [None if bool(r.all()) else r.nonzero().squeeze(1).to(device) for r in run]

    def begin(self, runner, state: LayerPass, start: int) -> None:
        n = state.hidden.shape[1]
        if self.run_matrix.shape != (runner.num_layers, n):
            raise ValueError(f"run must be [{runner.num_layers}, {n}], got {tuple(self.run_matrix.shape)}")
        if runner.swiftkv is not None and any(r is not None for r in self.rows[runner.swiftkv.layer:]):
            raise ValueError("a layer schedule may only skip layers below the SwiftKV layer")
        if state.mask is None and any(r is not None for r in self.rows):
            state.mask = causal_extension_mask(state.past, n, state.hidden.device)
        cache = state.cache
        if cache is None:
            return
        zeroed = set()
        for j, rows in enumerate(self.rows):
            slot = cache.slot(j)
            if rows is not None and j >= start and slot not in zeroed:
                cache.keys[slot][:, :, state.past:state.past + n].zero_()
                cache.values[slot][:, :, state.past:state.past + n].zero_()
                zeroed.add(slot)

    def run(self, runner, index: int, state: LayerPass) -> Tensor:
        rows = self.rows[index]
        if rows is None:
            return PLAIN.run(runner, index, state)
        if rows.numel() == 0:
            return state.hidden
        cache = state.cache
        if cache is not None:
            cache.rows = rows + state.past
        cos, sin = state.rope
        out = runner.run_layer(index, state.hidden[:, rows], (cos[:, rows], sin[:, rows]), cache,
                               state.mask[:, :, rows] if state.mask is not None else None)
        if cache is not None:
            cache.rows = None
        return state.hidden.index_copy(1, rows, out)


class SparseFFN:
    """FFN skipping for one pass (made fresh per pass): between the schedule's ``first`` and last skippable layer,
    an ``eligible`` column drops out of the FFN blocks of the layers after one whose FFN barely changed it."""

    def __init__(self, schedule: FFNSkip, eligible: Tensor):
        self.schedule, self.eligible = schedule, eligible
        self.columns: Tensor | None = None  # columns still running their FFN blocks
        self.layers = range(0)

    def begin(self, runner, state: LayerPass, start: int) -> None:
        self.columns = torch.arange(state.hidden.shape[1], device=state.hidden.device)
        self.layers = range(self.schedule.first, self.schedule.last(runner))

    def run(self, runner, index: int, state: LayerPass) -> Tensor:
        if index not in self.layers:
            return PLAIN.run(runner, index, state)
        hidden, similar = runner.run_layer_sparse_ffn(index, state, self.columns)
        self.columns = self.columns[~((similar >= self.schedule.threshold) & self.eligible[self.columns])]
        return hidden


def layer_hook(runner, schedule: LayerSkip | FFNSkip | None, rope: Tensor, shared: int) -> LayerHook:
    """How a pass runs its layers when its tokens sit at rotary positions ``rope`` ([1, n]) after a
    ``shared``-token prefix (offset = position - shared): SkipDecode, FFN skipping, or every layer."""
    offsets = rope[0] - shared
    if isinstance(schedule, FFNSkip):
        return SparseFFN(schedule, offsets >= schedule.warmup)
    if schedule is None or schedule.max_skip == 0:
        return PLAIN
    limit = runner.swiftkv.layer if runner.swiftkv is not None else None
    run = schedule.run_matrix(offsets, runner.num_layers, limit)
    return PLAIN if run is None else SkippedLayers(run, runner.device)

"""The attention ranker: which of the LM's heads, reading the question after the cached document, look at the
evidence (QRHead / ICR style), turned into a per-sentence log-probability that is fused with the sentence prior
inside the constrained search.

Why: with the prior alone the LM only chose where spans end, and the prior row matched cfic on NQ and HotpotQA
(issue 29) — the LM's reading of the document went unused for the start. The question pass attends over the whole
document anyway; :class:`~cfic.decoding.attention.SentenceAttentionTap` sums every head's attention on each
sentence. A sentence's score is a linear function of the log attention mass of every (row, layer, head) — row 0 is
the question's last token, row 1 the mean over its tokens — and of the log of its token count, and the ranker's
log-probability is the log-softmax of the scores over the window's sentences. Optionally (``null_weights``) the same
masses for a content-free question calibrate away what the heads look at whatever is asked (ICR). The weights are
fitted listwise on training splits only (``cfic fit-attention``) and ship with the adapter whose weights produced
the attention (``cfic/data/adapter/attention_ranker.safetensors``), like the prior's weights and the probe.

Fusion: the search ranks a sentence by ``log prior + fusion(n) * (attention log-probability - the window's best)``,
with ``fusion(n) = fusion * (n / 64) ** fusion_power`` for a window of ``n`` sentences: the heads' reading may be
worth more next to the prior in a short document than in a long one, where the question's attention spreads over
hundreds of sentences (the power is fitted on the training side with the weight; 0 is one weight everywhere). The
attention term is at most 0, so a document's fused scores never exceed its prior masses, and best-first reading's
stopping bound (the prior mass of the best sentence of an unread document) still holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cfic.decoding.attention import QueryUpdate, SentenceAttention
from cfic.errors import CficError
from cfic.files import SameByDigest, array_digest, read_safetensors

RANKER_FILE = "attention_ranker.safetensors"
ALONE_FILE = "attention_ranker_alone.safetensors"  # the ranking fitted without the prior (an evaluation row)
# The content-free question a calibrated ranker compares with (ICR): what the heads look at whatever is asked.
CONTENT_FREE_QUESTION = "N/A"
# The window size at which ``fusion`` is the fusion weight itself (``fusion_power`` scales it away from there).
REFERENCE_SENTENCES = 64


def fusion_weight(fusion: float, power: float, sentences: int) -> float:
    """``fusion * (sentences / REFERENCE_SENTENCES) ** power``: the one rule the search applies and ``cfic
    fit-attention`` cross-validates."""
    return fusion * (max(sentences, 1) / REFERENCE_SENTENCES) ** power


@dataclass(frozen=True, eq=False)
class AttentionRanker(SameByDigest):
    """``score = sum(weights * log(mass + eps)) [+ sum(null_weights * log(null mass + eps))] + length_weight *
    log(tokens)``; ``fusion``: its log-softmax's weight next to the prior in a window of ``REFERENCE_SENTENCES``
    sentences, scaled by ``(n / REFERENCE_SENTENCES) ** fusion_power`` in a window of ``n``. ``swiftkv_layer``: the
    SwiftKV layer of the model it was fitted on (the layers above run the last question token only, which changes
    the mean row)."""

    weights: np.ndarray  # [2, layers, heads]
    length_weight: float
    fusion: float
    eps: float = 1e-4
    null_weights: np.ndarray | None = None
    swiftkv_layer: int | None = None
    fusion_power: float = 0.0
    # A learned low-rank change of these layers' queries for the attention it reads (QueryUpdate; round 11).
    query_layers: tuple[int, ...] = ()
    query_a: np.ndarray | None = None  # [len(query_layers), heads, head_dim, rank]
    query_b: np.ndarray | None = None  # [len(query_layers), heads, rank, head_dim]

    def __post_init__(self) -> None:
        if self.weights.ndim != 3 or self.weights.shape[0] != 2:
            raise CficError(f"attention ranker weights must be [2, layers, heads], got {self.weights.shape}")
        if self.null_weights is not None and self.null_weights.shape != self.weights.shape:
            raise CficError("attention ranker null weights disagree in shape with its weights")
        values = [self.length_weight, self.fusion, self.eps, self.fusion_power]
        null_ok = self.null_weights is None or bool(np.isfinite(self.null_weights).all())
        if not (np.isfinite(self.weights).all() and null_ok and all(math.isfinite(v) for v in values)):
            raise CficError("attention ranker has non-finite weights")
        if self.fusion < 0 or self.eps <= 0:
            raise CficError("attention ranker needs fusion >= 0 and eps > 0")
        object.__setattr__(self, "query_layers", tuple(int(i) for i in self.query_layers))  # one digest per ranker
        if (self.query_a is None) != (self.query_b is None) or (self.query_a is None) != (not self.query_layers):
            raise CficError("attention ranker query update needs its layers, a and b together")
        if self.query_a is not None and self.query_b is not None:
            if not (np.isfinite(self.query_a).all() and np.isfinite(self.query_b).all()):
                raise CficError("attention ranker has a non-finite query update")
            if max(self.query_layers) >= self.weights.shape[1] or min(self.query_layers) < 0:
                raise CficError(f"attention ranker query update layers {self.query_layers} outside the model's "
                                f"{self.weights.shape[1]}")
            try:  # QueryUpdate checks the shapes agree with each other and with the layers
                self.query_update  # noqa: B018
            except ValueError as exc:
                raise CficError(f"attention ranker {exc}") from exc
            if self.query_a.shape[1] != self.weights.shape[2]:
                raise CficError("attention ranker query update has another head count than its weights")

    @cached_property
    def query_update(self) -> QueryUpdate | None:
        """The tap's :class:`~cfic.decoding.attention.QueryUpdate`, or None (the heads' own queries)."""
        if self.query_a is None or self.query_b is None:
            return None
        return QueryUpdate(tuple(self.query_layers), torch.from_numpy(self.query_a.astype(np.float32)),
                           torch.from_numpy(self.query_b.astype(np.float32)))

    @property
    def calibrated(self) -> bool:
        """Whether it needs the content-free question's attention too."""
        return self.null_weights is not None

    @property
    def digest(self) -> str:
        return array_digest(f"{self.length_weight}|{self.fusion}|{self.eps}|{self.swiftkv_layer}|{self.fusion_power}"
                            f"|{self.query_layers}", (self.weights, self.null_weights, self.query_a, self.query_b))

    def check(self, layers: int, heads: int, swiftkv_layer: int | None = None) -> None:
        """Refuse a model of another shape, or SwiftKV from a lower layer than the fit's. (SwiftKV off, or from the
        fit's layer or above, is accepted: the fit gives the mean row no weight from its SwiftKV layer on, where it
        is the last token's row, and the layers below read the same states either way.)"""
        if self.weights.shape[1:] != (layers, heads):
            raise CficError(f"the attention ranker was fitted for {self.weights.shape[1]} layers x "
                            f"{self.weights.shape[2]} heads, the model has {layers} x {heads}")
        if swiftkv_layer is not None and (self.swiftkv_layer is None or swiftkv_layer < self.swiftkv_layer):
            raise CficError(f"the attention ranker was fitted with SwiftKV from layer {self.swiftkv_layer}; from "
                            f"layer {swiftkv_layer} its mean-row weights read other states: refit it (cfic "
                            "fit-attention) or pass attention=None")

    def scores(self, attention: SentenceAttention, null: SentenceAttention | None = None) -> torch.Tensor:
        """Unnormalised per-sentence scores ``[sentences]`` (float32)."""
        w = torch.from_numpy(self.weights.astype(np.float32))
        mass = torch.stack([attention.last, attention.mean]).float().cpu()
        s = torch.einsum("rlhs,rlh->s", torch.log(mass + self.eps), w)
        if self.null_weights is not None:
            if null is None:
                raise CficError("this attention ranker needs the content-free question's attention")
            nmass = torch.stack([null.last, null.mean]).float().cpu()
            s = s + torch.einsum("rlhs,rlh->s", torch.log(nmass + self.eps),
                                 torch.from_numpy(self.null_weights.astype(np.float32)))
        return s + self.length_weight * torch.log(attention.tokens.float().cpu().clamp(min=1.0))

    def log_probabilities(self, attention: SentenceAttention, null: SentenceAttention | None = None) -> torch.Tensor:
        """log-softmax of :meth:`scores` over the window's sentences (each at most 0)."""
        return torch.log_softmax(self.scores(attention, null), dim=0)

    def fusion_at(self, sentences: int) -> float:
        """The fusion weight in a window of ``sentences`` sentences."""
        return fusion_weight(self.fusion, self.fusion_power, sentences)

    def fused(self, log_prior: torch.Tensor, first: int, attention: SentenceAttention,
              null: SentenceAttention | None = None) -> torch.Tensor:
        """A document's log prior with the window's sentences ``[first, first + n)`` lowered by :meth:`fusion_at`
        ``(n)`` times how far each one's attention log-probability lies below the window's best (a copy; other
        sentences keep their prior). Measured from the best rather than as a log-probability, so a window's many
        sentences do not lower all of them (documents of different lengths stay comparable) and the ranking inside
        it is the same."""
        out = log_prior.clone()
        n = attention.num_sentences
        lp = self.log_probabilities(attention, null)
        out[first: first + n] += self.fusion_at(n) * (lp - lp.max())
        return out

    def save(self, path: str | os.PathLike, info: dict[str, str] | None = None) -> None:
        from safetensors.numpy import save

        from cfic.files import write_atomic

        tensors = {"weights": np.ascontiguousarray(self.weights, dtype=np.float32)}
        if self.null_weights is not None:
            tensors["null_weights"] = np.ascontiguousarray(self.null_weights, dtype=np.float32)
        if self.query_a is not None and self.query_b is not None:
            tensors["query_a"] = np.ascontiguousarray(self.query_a, dtype=np.float32)
            tensors["query_b"] = np.ascontiguousarray(self.query_b, dtype=np.float32)
        meta = {"length_weight": repr(self.length_weight), "fusion": repr(self.fusion), "eps": repr(self.eps),
                "swiftkv_layer": "" if self.swiftkv_layer is None else str(self.swiftkv_layer),
                "fusion_power": repr(self.fusion_power), "query_layers": ",".join(map(str, self.query_layers)),
                **(info or {})}
        write_atomic(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionRanker:
        try:
            meta, tensors = read_safetensors(Path(path), "numpy", "attention ranker")
            sw = meta.get("swiftkv_layer", "")
            layers = tuple(int(x) for x in meta.get("query_layers", "").split(",") if x)
            return cls(tensors["weights"], float(meta["length_weight"]), float(meta["fusion"]),
                       float(meta.get("eps", "1e-4")), tensors.get("null_weights"), int(sw) if sw else None,
                       float(meta.get("fusion_power", "0.0")), layers, tensors.get("query_a"), tensors.get("query_b"))
        except (KeyError, ValueError) as exc:
            raise CficError(f"bad attention ranker file {str(path)!r}: {exc}") from exc

    def with_fusion(self, fusion: float, fusion_power: float | None = None) -> AttentionRanker:
        return dataclasses.replace(self, fusion=fusion,
                                   fusion_power=self.fusion_power if fusion_power is None else fusion_power)

    def with_query_update(self, layers: tuple[int, ...], a: np.ndarray | None, b: np.ndarray | None
                          ) -> AttentionRanker:
        """The same ranker reading the attention of queries changed by ``q + (q a) b`` at ``layers`` (``()``, None,
        None: the heads' own queries)."""
        return dataclasses.replace(self, query_layers=tuple(layers), query_a=a, query_b=b)

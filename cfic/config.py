"""One typed configuration object, passed down from the public API to the decoding functions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cfic.errors import CficError, require_positive_int
from cfic.prior import Abstention, PriorWeights

if TYPE_CHECKING:  # cfic.attention imports torch; the configuration stays importable without it
    from cfic.attention import AttentionRanker
    from cfic.question_likelihood import QuestionLikelihood

DEFAULT_INSTRUCTION = (
    "Read the document, then copy, word for word, the sentences of the document that answer the question. "
    "Copy them exactly as they appear; do not add anything."
)


@dataclass(frozen=True)
class GroundingConfig:
    """How cfic encodes documents and extracts evidence.

    ``top_k``: prefixes kept by the constrained prefix search (the CFIC paper uses 3) and evidence spans returned.
    ``distinct_spans``: when spans from the top-k starts overlap (they are merged, so fewer than ``top_k`` pieces
    remain), start further spans at the next-ranked sentences that no span covers yet, once per window. The prior
    often puts its best starts in one paragraph, and a merged span there leaves the rest of the document unread —
    costly for multi-hop questions. Applies to the search without LM steps (LM weight 0, the shipped default), where
    ranking more starts costs no forward pass. Off by default: on the training side it bought no ground against the
    baselines at the larger budget it makes (HotpotQA train-100 sentence F1 minus the prior +0.001 on vs -0.008 off,
    minus BM25 -0.008 vs +0.005; NQ train-60 answer recall 0.950 either way) for 41-47% more evidence tokens and a
    43-45% longer skip pass (BENCHMARKS.md, "Distinct spans").
    ``read_all_documents``: with several documents and the LM-free start search, the prior ranks the sentences of
    all documents together, documents are read best first and reading stops once no unread document could enter
    the top ``top_k`` (the same evidence as reading all); True reads every document up front in one batched
    prefill (``cfic bench --many-documents`` measures both).
    ``max_span_tokens``: the skip-decoding budget d; a span never runs past it (the paper's d = 256; 128 here: shorter
    evidence, half the skip-decoding work).
    ``max_sentence_tokens``: longer run-on sentences are cut at word boundaries.
    ``max_query_tokens``: room reserved for the question when a long document is cut into windows.
    ``window_overlap_tokens``: overlap between consecutive windows of a long document; defaults to
    ``max_span_tokens`` so every span that fits the budget lies whole inside some window.
    ``threshold``: spans scoring below it are dropped; when none remain the result says ``no_evidence``.
    ``max_context_tokens``: defaults to the model's own context length.
    ``encode_batch_tokens``: documents of similar length are prefilled together up to this many padded tokens.

    ``prior``: weights of the sentence prior (sentence-embedding and BM25 signals) combined with the LM in the
    constrained prefix search (:mod:`cfic.prior`); ``None`` runs the pure-LM search of the CFIC paper.
    ``abstention``: the fitted question-level ``no_evidence`` model; ``None`` never abstains (``threshold`` still
    drops low-scoring spans). Both come with the adapter (``cfic/data/adapter/cfic.json``).
    ``attention``: the fitted attention ranker (:mod:`cfic.attention`): the question pass's attention over the
    sentences, fused with the prior in the start search; ``None`` ranks starts by the prior alone. Comes with the
    adapter too (it belongs to the weights whose heads it reads); it needs a ``prior`` to fuse with.
    ``question_likelihood``: the fitted paragraph reading (:mod:`cfic.question_likelihood`): before the start
    search the LM reads the prior's best paragraphs, each alone with the question after it, and the question's
    log-likelihood re-weights their sentences' prior (UPR). Comes with the adapter; ``None`` skips the reading.
    ``hops``: 2 searches a second time with the first hop's best span appended to the question (one more question
    pass over the cached encodings, no new prefill) and returns that span followed by the second hop's best spans
    outside it: a multi-hop question's bridge sentence, then what the bridge points to. Needs a ``prior``.
    ``score_end_margin``: None (default) ends spans by skip decoding (the teacher-forced reference); a number ends
    them without a forward pass, taking following sentences while their search score (prior + attention) stays
    within this margin of the start's (:func:`cfic.decoding.skip.score_span_end`). Needs a ``prior``.

    Acceleration (all off by default; ``cfic bench`` measures each against the full model):
    ``swiftkv_layer``: SwiftKV SingleInputKV from this layer on — the K/V of layers ``>= swiftkv_layer`` come from
    that layer's input, and those layers run only for tokens whose outputs are read (never for the document). Without
    distilled parameters (``Grounder.from_pretrained(swiftkv=...)``) the model's own projections are used.
    ``swiftkv_group``: AcrossKV, one K/V per group of this many SwiftKV layers (less KV memory per token).
    ``layer_skip``: SkipDecode — answer tokens skip up to this many layers above the first ``layer_skip_warmup``
    (always run), growing linearly with their offset into the answer up to ``max_span_tokens``. (Skipping the
    layers right after the first one changed the chosen span end far more often in our measurements than skipping
    from layer 4 on, hence the default warm-up.)
    ``ffn_skip``: FFN-SkipLLM — a cosine threshold in (0, 1]: an answer token whose FFN block left its hidden state
    at least this similar skips the FFN blocks of the following layers below the SwiftKV layer (attention always
    runs); the first two layers and the first four answer tokens always run theirs. Excludes ``layer_skip``.
    """

    top_k: int = 3
    distinct_spans: bool = False
    read_all_documents: bool = False
    max_span_tokens: int = 128
    max_sentence_tokens: int = 96
    max_query_tokens: int = 256
    max_prefix_tokens: int = 48
    window_overlap_tokens: int | None = None
    threshold: float | None = None
    max_context_tokens: int | None = None
    encode_batch_tokens: int = 8192
    language: str = "en"
    instruction: str = field(default=DEFAULT_INSTRUCTION)
    swiftkv_layer: int | None = None
    swiftkv_group: int = 1
    ffn_skip: float | None = None
    layer_skip: int = 0
    layer_skip_warmup: int = 4
    prior: PriorWeights | None = None
    abstention: Abstention | None = None
    attention: AttentionRanker | None = None
    question_likelihood: QuestionLikelihood | None = None
    hops: int = 1
    score_end_margin: float | None = None

    def __post_init__(self) -> None:
        positive = ("top_k", "max_span_tokens", "max_sentence_tokens", "max_query_tokens", "max_prefix_tokens",
                    "encode_batch_tokens", "hops")
        for name in positive:
            require_positive_int(name, getattr(self, name))
        if self.score_end_margin is not None and (isinstance(self.score_end_margin, bool) or not isinstance(
                self.score_end_margin, (int, float)) or not 0.0 <= self.score_end_margin < float("inf")):
            raise CficError(f"score_end_margin must be a number >= 0 or None, got {self.score_end_margin!r}")
        if self.hops > 2:
            raise CficError(f"hops must be 1 or 2, got {self.hops!r}")
        if self.prior is None and (self.hops > 1 or self.score_end_margin is not None):
            raise CficError("hops=2 and score_end_margin rank by the sentence prior: they need a prior")
        if self.max_sentence_tokens > self.max_span_tokens:
            raise CficError("max_sentence_tokens must not exceed max_span_tokens")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise CficError(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if self.window_overlap_tokens is not None and self.window_overlap_tokens < 0:
            raise CficError("window_overlap_tokens must be >= 0")
        if self.swiftkv_layer is not None:
            require_positive_int("swiftkv_layer", self.swiftkv_layer)
        require_positive_int("swiftkv_group", self.swiftkv_group)
        if self.prior is not None and not isinstance(self.prior, PriorWeights):
            raise CficError(f"prior must be PriorWeights or None, got {type(self.prior).__name__}")
        if self.abstention is not None and not isinstance(self.abstention, Abstention):
            raise CficError(f"abstention must be an Abstention or None, got {type(self.abstention).__name__}")
        if self.attention is not None and not hasattr(self.attention, "fused"):
            raise CficError(f"attention must be an AttentionRanker or None, got {type(self.attention).__name__}")
        if self.question_likelihood is not None and not hasattr(self.question_likelihood, "max_passage_tokens"):
            raise CficError("question_likelihood must be a QuestionLikelihood or None, got "
                            f"{type(self.question_likelihood).__name__}")
        if self.ffn_skip is not None:
            if isinstance(self.ffn_skip, bool) or not isinstance(self.ffn_skip, (int, float)) \
                    or not 0.0 < self.ffn_skip <= 1.0:
                raise CficError(f"ffn_skip must be a cosine threshold in (0, 1], got {self.ffn_skip!r}")
            if self.layer_skip:
                raise CficError("ffn_skip and layer_skip exclude each other")
        for name in ("layer_skip", "layer_skip_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CficError(f"{name} must be a non-negative integer, got {value!r}")

    @property
    def overlap_tokens(self) -> int:
        return self.max_span_tokens if self.window_overlap_tokens is None else self.window_overlap_tokens

    def with_options(self, **options: object) -> GroundingConfig:
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise CficError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return replace(self, **options)  # type: ignore[arg-type]

    def encoding_key(self) -> tuple:
        """The fields that change a document's encoding (for caches keyed by configuration)."""
        return (self.max_span_tokens, self.max_sentence_tokens, self.max_query_tokens, self.overlap_tokens,
                self.max_context_tokens, self.language, self.instruction, self.swiftkv_layer, self.swiftkv_group,
                self.prior is not None)


def adapter_choice(adapter: str | None, no_adapter: bool) -> str | None:
    """What ``load_model(adapter=...)`` gets from the two CLI flags."""
    if no_adapter and adapter:
        raise CficError("--adapter and --no-adapter exclude each other")
    if no_adapter:
        return None
    return adapter or "auto"


def acceleration_options(swiftkv_layer: int | None = None, swiftkv_group: int | None = None,
                         swiftkv: str | None = None, layer_skip: int | None = None,
                         layer_skip_warmup: int | None = None, ffn_skip: float | None = None
                         ) -> tuple[dict[str, Any], str | None]:
    """The acceleration flags of ``cfic ground`` / ``cfic serve`` -> (GroundingConfig options, ``swiftkv`` argument
    of ``Grounder.from_pretrained``), checked before any model is loaded (bad values raise CficError).

    ``swiftkv``: ``"auto"`` (not given: the parameters shipped for the loaded weights, if any), ``"none"``,
    ``"bundled"`` or a parameter file from ``cfic distill-swiftkv``; its layer and group then set
    ``swiftkv_layer``/``swiftkv_group`` (given explicitly, they must agree — ``Grounder`` checks that)."""
    from pathlib import Path

    options: dict[str, Any] = {}
    if ffn_skip is not None:
        options["ffn_skip"] = ffn_skip
    if swiftkv_layer is not None:
        options["swiftkv_layer"] = swiftkv_layer
    if swiftkv_group is not None:
        options["swiftkv_group"] = swiftkv_group
    if layer_skip is not None:
        options["layer_skip"] = layer_skip
    if layer_skip_warmup is not None:
        options["layer_skip_warmup"] = layer_skip_warmup
    GroundingConfig(**options)  # the type and range checks, one message per bad value
    named = ("auto", "bundled", "none")
    if swiftkv is not None:
        swiftkv = str(swiftkv)
        if not swiftkv.strip():
            raise CficError("--swiftkv is empty; pass auto, bundled, none or a file written by cfic distill-swiftkv")
        if swiftkv not in named and not Path(swiftkv).expanduser().is_file():
            raise CficError(f"--swiftkv {swiftkv}: no such file (pass auto, bundled, none or a file written by "
                            "cfic distill-swiftkv)")
        if swiftkv not in named:
            swiftkv = str(Path(swiftkv).expanduser())
    elif swiftkv_group not in (None, 1) and swiftkv_layer is None:
        raise CficError("--swiftkv-group (AcrossKV) needs --swiftkv-layer or --swiftkv")
    if layer_skip_warmup is not None and not layer_skip:
        raise CficError("--layer-skip-warmup needs --layer-skip")
    return options, "auto" if swiftkv is None else swiftkv


# oneDNN and ideep keep a compiled kernel (with its scratch buffers) for every tensor shape they meet, up to 1024 of
# each by default. Every document has its own length, so a long-running process (``cfic serve``, ``batch``,
# ``evaluate``) grew by ~3 MiB per new document until the soak test's memory bound failed (a 120 s soak: +380 MiB
# beyond the model and its encoding cache). Bounded at 16, growth stops and speed is unchanged (measured: 40
# forwards of 400-900 tokens, 21 s vs 25 s; capacity 0 doubled the time). The user's own values win.
KERNEL_CACHE_CAPACITY = "16"


def bound_kernel_caches() -> None:
    """For long-running processes (the CLI calls it; a library user serving many documents should too). Read by
    oneDNN/ideep when they first build a kernel: setting them before the first forward pass is enough."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)
    os.environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)

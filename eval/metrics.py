"""What evidence is worth: answer recall, sentence precision/recall/F1, size, verbatim-ness, latency.

Every method hands back its evidence as :class:`Span` objects (document index, half-open character offsets,
text), so one set of functions scores them all the same way.

Answer matching: SQuAD-style normalisation (lower case, punctuation and symbols become spaces, articles
dropped, whitespace collapsed) and containment at token boundaries, so ``"10"`` does not match ``"100"``
while ``"April 25 , 2018"`` matches ``"April 25, 2018"``.

Sentence metrics compare *character spans*, not sentence ids, so they stay correct when a method (or the
gold annotation, e.g. HotpotQA's own sentences) splits text differently from us. Each document is cut into
reference sentences with :func:`cfic.text.split_sentences` (the splitter cfic itself uses, without the token
cap). A reference sentence is *selected* by a set of spans when the spans cover at least half of its
characters, or when it holds at least half of one span's characters (a span much shorter than a sentence
still picks the sentence it lies in). The same rule applied to the gold spans gives the gold sentences.
Precision, recall and F1 are then computed per example over selected vs gold reference sentences and
averaged over the examples that have gold sentences (macro average). Evidence that is not verbatim (the
``generate`` baseline's paraphrases) has no position in the document and so selects nothing: it counts for
answer recall and evidence tokens but cannot earn sentence credit.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation and symbols into spaces, drop English articles, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """True when some normalised answer occurs in the normalised text at token boundaries."""
    hay = f" {normalize_answer(text)} "
    for answer in answers:
        needle = normalize_answer(answer)
        if needle and f" {needle} " in hay:
            return True
    return False


@dataclass(frozen=True)
class Span:
    """One piece of evidence. ``document_index == -1`` marks text found verbatim in no document."""

    document_index: int
    start: int
    end: int
    text: str

    @property
    def located(self) -> bool:
        return self.document_index >= 0


def is_verbatim(span: Span, documents: Sequence[str]) -> bool:
    """The one check used for every method: the span's text is exactly the document's text at its offsets."""
    if not span.located or span.document_index >= len(documents):
        return False
    if not 0 <= span.start <= span.end <= len(documents[span.document_index]):
        return False
    return documents[span.document_index][span.start : span.end] == span.text


def locate(text: str, documents: Sequence[str]) -> Span:
    """Find ``text`` as an exact substring (first occurrence); unlocated when it is nowhere verbatim."""
    for index, document in enumerate(documents):
        pos = document.find(text) if text else -1
        if pos >= 0:
            return Span(index, pos, pos + len(text), text)
    return Span(-1, -1, -1, text)


Interval = tuple[int, int, int]  # (document index, start, end)


def _merge(intervals: Iterable[Interval]) -> dict[int, list[tuple[int, int]]]:
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for doc, start, end in sorted(intervals):
        if end <= start:
            continue
        runs = by_doc.setdefault(doc, [])
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return by_doc


def _overlap(start: int, end: int, runs: list[tuple[int, int]]) -> int:
    return sum(max(0, min(end, b) - max(start, a)) for a, b in runs if a < end and b > start)


def select_units(units: Sequence[Interval], spans: Iterable[Interval]) -> set[int]:
    """Indices of the reference sentences ``units`` that ``spans`` select (see the module docstring)."""
    spans = [s for s in spans if s[2] > s[1]]
    merged = _merge(spans)
    chosen: set[int] = set()
    for i, (doc, start, end) in enumerate(units):
        runs = merged.get(doc)
        if not runs or end <= start:
            continue
        if 2 * _overlap(start, end, runs) >= end - start:
            chosen.add(i)
            continue
        for sdoc, a, b in spans:
            if sdoc == doc and 2 * max(0, min(end, b) - max(start, a)) >= b - a:
                chosen.add(i)
                break
    return chosen


def sentence_prf(units: Sequence[Interval], gold: Sequence[Interval], evidence: Sequence[Interval]
                 ) -> tuple[float, float, float] | None:
    """Precision, recall, F1 of the evidence's sentences against the gold sentences; None without gold."""
    gold_units = select_units(units, gold)
    if not gold_units:
        return None
    picked = select_units(units, evidence)
    hit = len(picked & gold_units)
    precision = hit / len(picked) if picked else 0.0
    recall = hit / len(gold_units)
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return precision, recall, f1


@dataclass
class ExampleScore:
    """One method on one example. ``None`` means "not applicable" and is left out of the averages."""

    example_id: str
    answer_hit: bool | None
    precision: float | None
    recall: float | None
    f1: float | None
    evidence_tokens: int
    document_tokens: int
    evidence_sentences: int
    verbatim: bool | None
    no_evidence: bool
    answerable: bool
    latency_ms: float
    stages: dict[str, float] = field(default_factory=dict)
    evidence: list[str] | None = None  # the evidence texts, kept for auditing (not for whole documents)
    pieces: int = 0
    verbatim_pieces: int = 0
    no_evidence_probability: float | None = None  # cfic's P(no evidence), when it has an abstention model
    answered_hit: bool | None = None  # answer_hit of the evidence it would have given had it not abstained


def score_example(
    *,
    example_id: str,
    documents: Sequence[str],
    answers: Sequence[str],
    answerable: bool,
    gold: Sequence[Interval],
    units: Sequence[Interval],
    spans: Sequence[Span],
    no_evidence: bool,
    evidence_tokens: int,
    document_tokens: int,
    latency_ms: float,
    stages: dict[str, float] | None = None,
    keep_text: bool = False,
    no_evidence_probability: float | None = None,
    answered_spans: Sequence[Span] | None = None,
) -> ExampleScore:
    """Score one method's evidence on one example. ``answered_spans``: the evidence an abstaining method would
    have given (scored as ``answered_hit``)."""
    evidence_text = "\n".join(s.text for s in spans)
    answer_hit = contains_answer(evidence_text, answers) if answerable and answers else None
    answered = answer_hit if answered_spans is None else (
        contains_answer("\n".join(s.text for s in answered_spans), answers) if answerable and answers else None)
    verbatim_ok = [is_verbatim(s, documents) for s in spans]
    located = [(s.document_index, s.start, s.end) for s, ok in zip(spans, verbatim_ok, strict=True) if ok]
    prf = sentence_prf(units, gold, located) if answerable and gold else None
    picked = select_units(units, located) if located else set()
    return ExampleScore(
        example_id=example_id,
        answer_hit=answer_hit,
        precision=prf[0] if prf else None,
        recall=prf[1] if prf else None,
        f1=prf[2] if prf else None,
        evidence_tokens=evidence_tokens,
        document_tokens=document_tokens,
        evidence_sentences=len(picked),
        verbatim=all(verbatim_ok) if spans else None,
        no_evidence=no_evidence or not spans,
        answerable=answerable,
        latency_ms=latency_ms,
        stages=dict(stages or {}),
        pieces=len(spans),
        verbatim_pieces=sum(verbatim_ok),
        evidence=[s.text for s in spans] if keep_text else None,
        no_evidence_probability=no_evidence_probability,
        answered_hit=answered,
    )


def _mean(values: Iterable[float | bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear between order statistics, as numpy and ``statistics.quantiles``
    "inclusive"); None for no values. The one convention of every latency figure cfic reports."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(value, digits)


STAGES = ("encode_ms", "reading_ms", "prefix_ms", "skip_ms", "generate_ms")


def aggregate(scores: Sequence[ExampleScore], *, with_no_evidence: bool) -> dict[str, float | int | None]:
    """One method's row of the report.

    ``compression`` is mean document tokens divided by mean evidence tokens (20 means the evidence is a
    twentieth of the document; 1 for the whole document); ``verbatim_rate`` is the share of examples with
    evidence whose every piece is exactly in the document; ``no_evidence_accuracy`` (datasets with
    unanswerable questions) is the share of examples where "returned no evidence" equals "the question is
    unanswerable".
    """
    evidence_tokens = _mean(s.evidence_tokens for s in scores)
    document_tokens = _mean(s.document_tokens for s in scores)
    compression = (document_tokens / evidence_tokens) if evidence_tokens and document_tokens else None
    latencies = [s.latency_ms for s in scores]
    pieces = sum(s.pieces for s in scores)
    row: dict[str, float | int | None] = {
        "n": len(scores),
        "answer_recall": _round(_mean(s.answer_hit for s in scores)),
        "answer_n": sum(1 for s in scores if s.answer_hit is not None),
        "sentence_precision": _round(_mean(s.precision for s in scores)),
        "sentence_recall": _round(_mean(s.recall for s in scores)),
        "sentence_f1": _round(_mean(s.f1 for s in scores)),
        "evidence_tokens": _round(evidence_tokens, 1),
        "evidence_sentences": _round(_mean(s.evidence_sentences for s in scores), 2),
        "document_tokens": _round(document_tokens, 1),
        "compression": _round(compression, 2),
        "verbatim_rate": _round(_mean(s.verbatim for s in scores)),
        "verbatim_piece_rate": _round(sum(s.verbatim_pieces for s in scores) / pieces if pieces else None),
        "no_evidence_rate": _round(_mean(s.no_evidence for s in scores)),
        "latency_ms_p50": _round(percentile(latencies, 50), 1),
        "latency_ms_p95": _round(percentile(latencies, 95), 1),
    }
    if with_no_evidence:
        row["no_evidence_accuracy"] = _round(_mean(s.no_evidence == (not s.answerable) for s in scores))
    for stage in STAGES:
        values = [s.stages[stage] for s in scores if stage in s.stages]
        if values:
            row[f"{stage}_p50"] = _round(percentile(values, 50), 1)
            row[f"{stage}_p95"] = _round(percentile(values, 95), 1)
    return row

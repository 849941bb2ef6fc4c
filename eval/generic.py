"""The generic evaluation schema: any QA set with evidence, as ``cfic evaluate --dataset generic --data-file FILE``.

FILE is anything :func:`cfic.eval.tables.load_table` reads (JSONL, JSON, CSV, parquet, a saved dataset folder, a hub
name). One row per question:

- ``question`` (string, required);
- ``documents`` (list of strings) or ``document`` (string) — the text(s) to ground the question in (required);
- ``answers`` (list of strings, or one string; may be empty) — answer recall counts a question as found when a
  normalised answer occurs in the evidence;
- ``id`` (string or integer, optional; default: the row number) — unique;
- ``gold`` (optional) — the gold evidence as character spans, a list of ``{"document": i, "start": a, "end": b}``
  (``document`` defaults to 0) with ``documents[i][a:b]`` the evidence; sentence precision/recall/F1 need it;
- ``answerable`` (bool, optional) — ``false`` marks a question the documents do not answer (no-evidence accuracy
  is reported when any row is unanswerable). Default: answerable when the row has answers or gold spans, else
  unanswerable — the SQuAD 2.0 convention, where an unanswerable question is one with an empty answer list. Give
  ``answerable: true`` explicitly for a question whose answer you did not label.

Rows with identical documents get the same ``doc_key`` and are evaluated one after the other (in the order their
document set first appears, rows in file order within it): the runner keeps one prepared document set per method,
so this is what lets such rows share one encoding, and what makes the per-question share of its cost correct.

:class:`Example` is defined here, as the in-memory form of this schema: every dataset becomes a list of them (the
bundled ones in :mod:`cfic.eval.datasets`, which imports this module and never the other way round).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cfic.errors import CficError
from cfic.eval.metrics import Interval
from cfic.eval.tables import row_id, row_question, row_texts


@dataclass(frozen=True)
class Example:
    """One evaluation item. ``gold`` holds (document index, start, end) character spans of the gold sentences;
    ``doc_key`` is the same for examples that share their documents (their encodings can be reused)."""

    id: str
    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...]
    gold: tuple[Interval, ...]
    answerable: bool = True
    doc_key: str = ""


def _texts(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    texts = row_texts(row, where)
    if texts is None:
        raise CficError(f"{where}: needs 'documents' (a list of strings) or 'document' (a string)")
    return texts


def _answers(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    answers = row.get("answers")
    if answers is None:
        return ()
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, Iterable) or not all(isinstance(a, str) for a in answers):
        raise CficError(f"{where}: 'answers' must be a list of strings")
    return tuple(a for a in answers if a.strip())


def _gold(row: Mapping[str, Any], texts: tuple[str, ...], where: str) -> tuple[Interval, ...]:
    spans = row.get("gold")
    if spans is None:
        return ()
    if isinstance(spans, (str, Mapping)) or not isinstance(spans, Iterable):
        raise CficError(f"{where}: 'gold' must be a list of {{document, start, end}} spans")
    out: list[Interval] = []
    for j, span in enumerate(spans):
        at = f"{where}, gold[{j}]"
        if not isinstance(span, Mapping):
            raise CficError(f"{at}: expected {{\"document\": i, \"start\": a, \"end\": b}}")
        doc = 0 if span.get("document") is None else span["document"]
        start, end = span.get("start"), span.get("end")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (doc, start, end)):
            raise CficError(f"{at}: document, start and end must be integers")
        if not 0 <= doc < len(texts):
            raise CficError(f"{at}: document {doc} does not exist (the row has {len(texts)})")
        if not 0 <= start < end <= len(texts[doc]):
            raise CficError(f"{at}: needs 0 <= start < end <= {len(texts[doc])} (the document's length), got "
                            f"{start}..{end}")
        out.append((doc, start, end))
    return tuple(out)


def _answerable(row: Mapping[str, Any], where: str, *, labelled: bool) -> bool:
    value = row.get("answerable")
    if value is None:
        return labelled
    if not isinstance(value, bool):
        raise CficError(f"{where}: 'answerable' must be true or false")
    return value


def examples_from_table(table: Iterable[Mapping[str, Any]]) -> list[Example]:
    """Validated :class:`Example` objects, one per row, grouped by their documents (see the module docstring)."""
    examples: list[Example] = []
    seen: set[str] = set()
    for i, row in enumerate(table):
        where = f"row {i + 1}"
        question = row_question(row, where)
        example_id = row_id(row, where, default=str(i + 1))
        if example_id in seen:
            raise CficError(f"{where}: id {example_id!r} appears twice")
        seen.add(example_id)
        texts = _texts(row, where)
        answers, gold = _answers(row, where), _gold(row, texts, where)
        answerable = _answerable(row, where, labelled=bool(answers or gold))
        if not answerable and gold:
            raise CficError(f"{where}: an unanswerable question cannot have gold evidence")
        digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        examples.append(Example(id=example_id, question=question.strip(), answers=answers, documents=texts,
                                gold=gold, answerable=answerable, doc_key=f"generic:{digest}"))
    if not examples:
        raise CficError("the data file has no rows")
    first_seen = {key: n for n, key in reversed(list(enumerate(e.doc_key for e in examples)))}
    return sorted(examples, key=lambda e: first_seen[e.doc_key])  # stable: file order within a document set

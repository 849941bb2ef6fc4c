"""Cutting documents into the passages the index embeds, one vector each.

A document's sentences (``cfic.text.split_sentences``; a run-on sentence is cut at word boundaries) are packed
greedily, in order, into passages of at most ``max_tokens`` embedding-model tokens. Several vectors per document keep
a fact on page 30 findable, where one vector for the whole document would blur it into the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cfic.types import Document

CountTokens = Callable[[Sequence[str]], list[int]]


def split_passages(text: str, count_tokens: CountTokens, max_tokens: int, *, language: str = "en"
                   ) -> list[tuple[int, int]]:
    """Pack consecutive sentences into passages of at most ``max_tokens`` tokens; returns (start, end) spans.

    Token counts of sentences are summed, so a passage may run a few tokens over the model's own count of the
    joined text; that is why the default budget sits well under the model's limit.
    """
    from cfic.text import split_sentences

    sentences = split_sentences(text, language=language, max_tokens=max_tokens, count_tokens=count_tokens)
    if not sentences:
        return []
    counts = count_tokens([s.text for s in sentences])
    spans: list[tuple[int, int]] = []
    start, end, used = sentences[0].start, sentences[0].end, 0
    for sentence, n in zip(sentences, counts, strict=True):
        if used and used + n > max_tokens:
            spans.append((start, end))
            start, used = sentence.start, 0
        end = sentence.end
        used += n
    spans.append((start, end))
    return spans


def split_documents(docs: Sequence[Document], count_tokens: CountTokens, max_tokens: int
                    ) -> tuple[list[tuple[int, int]], list[int], list[str]]:
    """The passages of all ``docs``, in order: their spans, the positions of their documents in ``docs``
    (non-decreasing, so one document's passages are one slice) and their texts."""
    spans: list[tuple[int, int]] = []
    owners: list[int] = []
    texts: list[str] = []
    for i, doc in enumerate(docs):
        for a, b in split_passages(doc.text, count_tokens, max_tokens):
            spans.append((a, b))
            owners.append(i)
            texts.append(doc.text[a:b])
    return spans, owners, texts

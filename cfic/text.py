"""Sentences with exact character offsets.

Every evidence span in cfic is a run of whole sentences, so the sentence spans computed here are the only source of
character offsets in the product (never tokenizer offset mappings). Offsets are Python code points, half-open.

Layout first, then language: each non-empty line is its own block (titles, list items and table rows are sentences
of their own), and `sentencex` (a maintained, multilingual rule-based splitter) splits sentences inside a block.
A run-on "sentence" longer than ``max_tokens`` is cut at word boundaries so it cannot swallow a document.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencex

_LINE = re.compile(r"[^\n\r\u2028\u2029\x0b\x0c\x1c\x1d\x1e\x85]+")
_WORD = re.compile(r"\S+\s*")


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence: ``document[start:end] == text``; no leading or trailing whitespace."""

    start: int
    end: int
    text: str


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split_block(text: str, start: int, end: int, language: str) -> list[tuple[int, int]]:
    block = text[start:end]
    spans: list[tuple[int, int]] = []
    pos = 0
    for boundary in sentencex.get_sentence_boundaries(language, block):
        a, b = boundary["start_index"], boundary["end_index"]
        if block[a:b] != boundary["text"]:  # never trust offsets we cannot verify
            found = block.find(boundary["text"], pos)
            if found < 0:
                continue
            a, b = found, found + len(boundary["text"])
        a, b = _strip_span(block, max(a, pos), b)
        if b > a:
            spans.append((start + a, start + b))
            pos = b
    if not spans:
        a, b = _strip_span(text, start, end)
        if b > a:
            spans.append((a, b))
    return spans


def _safe_cut(text: str, pos: int, lo: int) -> int:
    """Move a hard cut left so it never separates a base character from its combining marks or a surrogate-like
    joiner sequence (ZWJ emoji)."""
    while pos > lo + 1 and (
        unicodedata.combining(text[pos]) or text[pos] in "\u200d\ufe0f" or text[pos - 1] == "\u200d"
    ):
        pos -= 1
    return pos


def _cap_span(
    text: str, start: int, end: int, max_tokens: int, count_tokens: Callable[[Sequence[str]], list[int]]
) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` into pieces of at most ``max_tokens`` tokens at word boundaries."""
    words = [(m.start() + start, m.end() + start) for m in _WORD.finditer(text[start:end])]
    if not words:
        return [(start, end)]
    counts = count_tokens([text[a:b] for a, b in words])
    pieces: list[tuple[int, int]] = []
    piece_start, used = words[0][0], 0
    for (a, b), n in zip(words, counts, strict=True):
        if used and used + n > max_tokens:
            pieces.append(_strip_span(text, piece_start, a))
            piece_start, used = a, 0
        if n > max_tokens:  # a single huge "word" (a URL, base64, ...): cut it by characters
            chars_per_piece = max(1, (b - a) * max_tokens // n)
            cut = a
            while b - cut > chars_per_piece:
                nxt = _safe_cut(text, cut + chars_per_piece, cut)
                pieces.append((cut, nxt))
                cut = nxt
            piece_start, used = cut, count_tokens([text[cut:b]])[0]
            continue
        used += n
    pieces.append(_strip_span(text, piece_start, end))
    return [(a, b) for a, b in pieces if b > a]


def split_sentences(
    text: str,
    *,
    language: str = "en",
    max_tokens: int | None = None,
    count_tokens: Callable[[Sequence[str]], list[int]] | None = None,
) -> list[Sentence]:
    """Split ``text`` into sentences whose offsets index ``text`` exactly.

    ``count_tokens`` (a batch token counter) and ``max_tokens`` together cap sentence length; without them the
    splitter is purely linguistic.
    """
    spans: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        spans.extend(_split_block(text, line.start(), line.end(), language))
    if max_tokens is not None and count_tokens is not None and spans:
        lengths = count_tokens([text[a:b] for a, b in spans])
        capped: list[tuple[int, int]] = []
        for (a, b), n in zip(spans, lengths, strict=True):
            capped.extend(_cap_span(text, a, b, max_tokens, count_tokens) if n > max_tokens else [(a, b)])
        spans = capped
    return [Sentence(a, b, text[a:b]) for a, b in spans]


def decode_text(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text (a byte-order mark dropped), or a DocumentReadError naming ``name``: a NUL byte
    anywhere means a binary file, which would otherwise become evidence made of garbage."""
    from cfic.errors import DocumentReadError

    if b"\x00" in data:
        raise DocumentReadError(f"{name}: looks like a binary file (it contains NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentReadError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, read whole, with one clear DocumentReadError for each way it can fail."""
    from cfic.errors import DocumentReadError

    p = Path(path)
    if not p.exists():
        raise DocumentReadError(f"{path}: no such file")
    if p.is_dir():
        raise DocumentReadError(f"{path}: is a directory")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DocumentReadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_text(data, str(path))

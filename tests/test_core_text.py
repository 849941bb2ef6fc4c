"""Sentence splitting: exact offsets on any text, layout-aware blocks, and the token cap."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from cfic.text import split_sentences


def _check(text: str) -> list:
    sents = split_sentences(text)
    prev_end = 0
    for s in sents:
        assert text[s.start:s.end] == s.text
        assert s.text and s.text == s.text.strip()
        assert s.start >= prev_end  # ordered, non-overlapping
        prev_end = s.end
    # nothing but whitespace is left out
    covered = set()
    for s in sents:
        covered.update(range(s.start, s.end))
    assert all(text[i].isspace() for i in range(len(text)) if i not in covered)
    return sents


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_offsets_exact_on_arbitrary_unicode(text):
    _check(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["Dr. Who ran.", "東京は大きい。", "Emoji 😀 ok!", "e\u0301te\u0301.", "\n", "\n\n",
                                 "- item one", "| a | b |", "  ", "Title", "Why? Yes."]), max_size=30))
def test_offsets_exact_on_structured_text(parts):
    _check(" ".join(parts))


def test_lines_titles_lists_and_tables_are_their_own_sentences():
    text = "Title of the page\n\n- first item\n- second item\n| col a | col b |\n| 1 | 2 |\nA sentence. Another one."
    texts = [s.text for s in _check(text)]
    assert texts == ["Title of the page", "- first item", "- second item", "| col a | col b |", "| 1 | 2 |",
                     "A sentence.", "Another one."]


def test_abbreviations_and_cjk():
    texts = [s.text for s in _check("Dr. Smith met Mr. Jones in Washington. 東京は日本の首都です。人口は多い。")]
    assert texts == ["Dr. Smith met Mr. Jones in Washington.", "東京は日本の首都です。", "人口は多い。"]


def _words(texts):
    return [len(t.split()) for t in texts]


def test_run_on_sentence_is_capped_at_word_boundaries():
    text = " ".join(f"w{i}" for i in range(500)) + "."
    sents = split_sentences(text, max_tokens=40, count_tokens=_words)
    assert len(sents) == 13
    assert all(len(s.text.split()) <= 40 for s in sents)
    assert " ".join(s.text for s in sents) == text


def test_huge_word_is_cut_without_splitting_combining_marks():
    text = ("e\u0301" * 300) + " end."
    sents = split_sentences(text, max_tokens=50, count_tokens=lambda ts: [len(t) // 2 + 1 for t in ts])
    assert len(sents) > 1
    for s in sents:
        assert text[s.start:s.end] == s.text
        assert not unicodedata.combining(s.text[0])

"""Evaluation data: the bundled splits, NQ document building, and clear errors for bad data files."""

from __future__ import annotations

import gzip
import json

import pytest

from cfic.errors import CficError
from cfic.eval.datasets import DATA_DIR, PASSAGE_SEPARATOR, load_split, read_nq_file
from cfic.eval.metrics import contains_answer

TOPICS = [
    ("Mount Everest", "Mount Everest is the highest mountain on Earth. It rises 8,849 metres above sea level.",
     "how tall is mount everest", ["8,849 metres"]),
    ("Nile", "The Nile is a major river in Africa. It flows north into the Mediterranean Sea.",
     "where does the nile flow into", ["Mediterranean Sea"]),
    ("Python (language)", "Python is a programming language. Guido van Rossum created it in 1991.",
     "who created python", ["Guido van Rossum"]),
    ("Moon", "The Moon orbits the Earth. Neil Armstrong walked on it first in 1969.",
     "who first walked on the moon", ["Neil Armstrong"]),
    ("Jupiter", "Jupiter is the largest planet of the Solar System. It has a Great Red Spot.",
     "what is the largest planet", ["Jupiter"]),
    ("Mozart", "Wolfgang Amadeus Mozart was a composer. He was born in Salzburg in 1756.",
     "where was mozart born", ["Salzburg"]),
    ("Tea", "Tea is a drink made from leaves. It originated in China thousands of years ago.",
     "where did tea originate", ["China"]),
    ("Chess", "Chess is a board game for two players. Each player starts with sixteen pieces.",
     "how many pieces does each chess player start with", ["sixteen"]),
]


def record(title: str, long_answer: str, question: str, answers: list[str]) -> dict:
    first = long_answer.split(". ")[0] + "."
    return {"question": question, "answers": answers,
            "ctxs": [{"title": title, "text": first, "hasanswer": False, "isgold": True}],
            "nq_annotated_gold": {"title": title, "long_answer": long_answer, "chunked_long_answer": first,
                                  "short_answers": answers}}


@pytest.fixture
def nq_file(tmp_path):
    path = tmp_path / "mini-nq.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for topic in TOPICS:
            fh.write(json.dumps(record(*topic)) + "\n")
    return path


def test_user_nq_file_builds_documents_like_the_bundled_ones(nq_file):
    examples = load_split("nq", data_file=nq_file, k=4, seed=3)
    assert len(examples) == len(TOPICS)
    for ex, (title, long_answer, question, answers) in zip(examples, TOPICS, strict=True):
        assert ex.question == question
        passages = ex.documents[0].split(PASSAGE_SEPARATOR)
        assert len(passages) == 4
        gold_passage = f"Title: {title}\n{long_answer}"
        assert passages.count(gold_passage) == 1
        for p in passages:
            assert p.startswith("Title: ")
            if p != gold_passage:  # distractors never hold an answer and never come from the same record
                assert not contains_answer(p, answers)
                assert not p.startswith(f"Title: {title}\n")
        assert ex.gold, "the sentence holding the short answer is gold"
        for _, a, b in ex.gold:
            assert contains_answer(ex.documents[0][a:b], answers)
            assert ex.documents[0][a:b] in long_answer


def test_seed_moves_the_gold_passage_deterministically(nq_file):
    def positions(seed):
        out = []
        for ex in load_split("nq", data_file=nq_file, k=5, seed=seed):
            out.append(ex.documents[0].split(PASSAGE_SEPARATOR).index(
                next(p for p in ex.documents[0].split(PASSAGE_SEPARATOR) if ex.documents[0].find(p) <= ex.gold[0][1]
                     < ex.documents[0].find(p) + len(p))))
        return out

    assert positions(0) == positions(0)
    assert any(positions(s) != positions(0) for s in (1, 2, 3))
    assert load_split("nq", data_file=nq_file, limit=3) == load_split("nq", data_file=nq_file)[:3]


def test_bundled_nq_split_is_fixed_and_disjoint_from_train():
    eval_examples = load_split("nq")
    assert len(eval_examples) == 300
    assert load_split("nq", limit=7) == eval_examples[:7]
    train = load_split("nq", "train")
    assert train and not {e.question for e in eval_examples} & {e.question for e in train}
    eval_gold = {e.documents[0][a:b] for e in eval_examples for _, a, b in e.gold}
    for ex in train[:200]:  # training documents never contain an eval gold sentence
        assert not any(g in ex.documents[0] for g in eval_gold)
    assert all(e.gold and e.answers for e in eval_examples)


@pytest.mark.parametrize("name", ["hotpotqa", "squad", "nq-long"])
def test_prebuilt_datasets_have_consistent_gold(name):
    examples = load_split(name)
    assert examples
    for ex in examples:
        doc = ex.documents[0]
        for d, a, b in ex.gold:
            assert d == 0 and 0 <= a < b <= len(doc) and doc[a:b].strip() == doc[a:b]
        if name == "squad" and ex.answerable:
            assert any(contains_answer(doc[a:b], ex.answers) for _, a, b in ex.gold)
        if not ex.answerable:
            assert not ex.gold and not ex.answers
    if name == "squad":
        assert sum(not e.answerable for e in examples) > 0
        assert {e.doc_key for e in examples} == {"squad:Normans"}
        train = load_split("squad", "train")
        assert train and sum(not e.answerable for e in train) > 0
        assert not {e.doc_key for e in train} & {e.doc_key for e in examples}
        # two training articles, the LoRA's first, so the recipes that take the first questions read only it
        keys = [e.doc_key for e in train]
        assert len(set(keys)) == 2 and keys == sorted(keys, key=lambda k: k != keys[0])
        from cfic.training.lora_items import squad_lora_article
        lora = squad_lora_article()
        assert lora and {e.doc_key for e in lora} == {keys[0]} and lora == squad_lora_article(len(lora) + 5)[:len(lora)]


def test_hotpotqa_train_side_is_separate():
    ev, tr = load_split("hotpotqa"), load_split("hotpotqa", "train")
    assert ev and tr and not {e.question for e in ev} & {e.question for e in tr}


def test_bad_arguments_are_clear_errors(nq_file):
    with pytest.raises(CficError, match="unknown dataset"):
        load_split("trivia")
    with pytest.raises(CficError, match="--limit"):
        load_split("nq", limit=0)
    with pytest.raises(CficError, match="--k"):
        load_split("hotpotqa", k=5)
    with pytest.raises(CficError, match="--k"):
        load_split("nq", data_file=nq_file, k=0)
    with pytest.raises(CficError, match="no 'train' split"):
        load_split("nq-long", "train")
    with pytest.raises(CficError, match="--data-file"):
        load_split("squad", data_file=nq_file)


def test_malformed_data_files_name_the_line(tmp_path):
    good = json.dumps(record(*TOPICS[0]))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n\n" + "{not json\n")
    with pytest.raises(CficError, match=r"bad\.jsonl:3: not valid JSON"):
        read_nq_file(bad_json)
    missing = tmp_path / "missing.jsonl"
    broken = record(*TOPICS[1])
    del broken["nq_annotated_gold"]["long_answer"]
    missing.write_text(good + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(CficError, match=r"missing\.jsonl:2: .*long_answer"):
        read_nq_file(missing)
    wrong_type = tmp_path / "types.jsonl"
    wrong_type.write_text(json.dumps({**record(*TOPICS[2]), "answers": "Guido"}) + "\n")
    with pytest.raises(CficError, match=r"types\.jsonl:1: 'answers'"):
        read_nq_file(wrong_type)
    with pytest.raises(CficError, match="does not exist"):
        read_nq_file(tmp_path / "nope.jsonl")
    with pytest.raises(CficError, match="is a directory"):
        read_nq_file(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CficError, match="no records"):
        read_nq_file(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(CficError, match="not UTF-8"):
        read_nq_file(binary)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(((good + "\n") * 50).encode())[:60])
    with pytest.raises(CficError, match="cut.jsonl.gz"):
        read_nq_file(truncated)


def test_bundled_files_stay_small_and_flat():
    files = list(DATA_DIR.iterdir())
    assert all(f.is_file() for f in files)  # package data is declared as data/*: no subfolders
    assert sum(f.stat().st_size for f in files) < 5_000_000
    assert (DATA_DIR / "ATTRIBUTION.md").read_text().count("CC BY-SA") >= 4

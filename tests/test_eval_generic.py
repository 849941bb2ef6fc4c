"""Users' data through ``datasets``: every file kind `load_table` reads, the generic evaluation schema, its errors,
and `cfic evaluate --dataset generic` end to end on a file the test writes."""

from __future__ import annotations

import gzip
import json

import pytest

from cfic.errors import CficError
from cfic.eval.datasets import load_split
from cfic.eval.generic import examples_from_table
from cfic.eval.runner import evaluate
from cfic.eval.tables import load_table

PARIS = "Paris is the capital of France. It lies on the Seine. The city has many museums."
TOKYO = "Tokyo is the capital of Japan. It is a very large city. Mount Fuji can be seen from it."
ROWS = [
    {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "documents": [PARIS, TOKYO],
     "gold": [{"document": 0, "start": 0, "end": 31}]},
    {"id": "q2", "question": "Which river flows through Paris?", "answers": ["Seine"], "documents": [PARIS, TOKYO],
     "gold": [{"document": 0, "start": 32, "end": 53}]},
    {"id": "q3", "question": "Who painted the Mona Lisa?", "answers": [], "documents": [TOKYO],
     "answerable": False},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and a private cache: what works here works on an offline machine."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_file_kind_gives_the_same_rows(tmp_path):
    import datasets

    rows = [{"question": "Where?", "document": PARIS, "answers": ["Paris"]},
            {"question": "What?", "document": TOKYO, "answers": ["Japan"]}]
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    gzipped = tmp_path / "q.jsonl.gz"
    gzipped.write_bytes(gzip.compress(jsonl.read_bytes()))
    csv = tmp_path / "q.csv"
    datasets.Dataset.from_list([{**r, "answers": r["answers"][0]} for r in rows]).to_csv(str(csv))
    parquet = tmp_path / "q.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for source in (jsonl, gzipped, csv, parquet, saved):
        got = [(r["question"], r["document"]) for r in load_table(source)]
        assert got == [(r["question"], r["document"]) for r in rows], source
    # a CSV cell holds one answer as a string: the schema accepts it as a one-answer list
    assert [e.answers for e in examples_from_table(load_table(csv))] == [("Paris",), ("Japan",)]


def test_a_saved_dataset_dict_needs_its_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:2])}).save_to_disk(str(folder))
    with pytest.raises(CficError, match="several splits.*--split"):
        load_table(folder)
    assert [r["id"] for r in load_table(folder, split="test")] == ["q2"]
    with pytest.raises(CficError, match="no split 'dev'"):
        load_table(folder, split="dev")


def test_the_generic_schema_becomes_examples(tmp_path):
    examples = examples_from_table(load_table(write_jsonl(tmp_path / "g.jsonl", ROWS)))
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    q1, q2, q3 = examples
    assert q1.documents == (PARIS, TOKYO) and q1.answers == ("Paris",)
    assert q1.gold == ((0, 0, 31),) and PARIS[0:31] == "Paris is the capital of France."
    assert PARIS[32:53] == "It lies on the Seine."
    assert q1.answerable and not q3.answerable and q3.gold == ()
    assert q1.doc_key == q2.doc_key != q3.doc_key  # same documents: one encoding for both questions


def test_answerable_defaults_to_having_answers_or_gold_and_rows_are_grouped_by_documents():
    rows = [{"id": "a", "question": "Q1?", "document": PARIS, "answers": ["Paris"]},
            {"id": "b", "question": "Q2?", "document": TOKYO, "answers": []},  # SQuAD 2.0 style: unanswerable
            {"id": "c", "question": "Q3?", "document": PARIS, "gold": [{"start": 0, "end": 31}]},
            {"id": "d", "question": "Q4?", "document": TOKYO, "answerable": True}]  # unlabelled but answerable
    examples = examples_from_table(rows)
    # the two PARIS rows first, then the two TOKYO rows: each document set is prepared once in a run
    assert [(e.id, e.answerable) for e in examples] == [("a", True), ("c", True), ("b", False), ("d", True)]
    assert examples[0].doc_key == examples[1].doc_key != examples[2].doc_key == examples[3].doc_key


@pytest.mark.parametrize(("row", "message"), [
    ({"document": PARIS}, "row 1: 'question'"),
    ({"question": "Q?"}, "row 1: needs 'documents'"),
    ({"question": "Q?", "documents": PARIS}, "must be a list of strings"),
    ({"question": "Q?", "document": PARIS, "documents": [PARIS]}, "not both"),
    ({"question": "Q?", "document": PARIS, "gold": [{"start": 5, "end": 500}]}, r"gold\[0\].*<= 80 "),
    ({"question": "Q?", "document": PARIS, "gold": [{"document": 2, "start": 0, "end": 5}]}, "document 2 does not"),
    ({"question": "Q?", "document": PARIS, "answerable": "no"}, "'answerable' must be true or false"),
    ({"question": "Q?", "document": PARIS, "answerable": False, "gold": [{"start": 0, "end": 5}]}, "unanswerable"),
])
def test_bad_rows_are_named_with_what_is_wrong(row, message):
    with pytest.raises(CficError, match=message):
        examples_from_table([row])


def test_duplicate_ids_and_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(CficError, match="row 2: id 'a' appears twice"):
        examples_from_table([{"id": "a", "question": "Q?", "document": PARIS}] * 2)
    with pytest.raises(CficError, match="does not exist"):
        load_table(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CficError, match="is empty"):
        load_table(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "Q?", "document": \n')
    with pytest.raises(CficError, match="could not read"):
        load_table(tmp_path / "broken.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CficError, match="unknown file type"):
        load_table(tmp_path / "notes.txt")
    with pytest.raises(CficError, match="Hugging Face hub.*work offline"):
        load_table("someone/a-dataset-name")
    with pytest.raises(CficError, match="needs --data-file"):
        load_split("generic")


def test_evaluate_generic_end_to_end(tmp_path, tiny_grounder):
    data = write_jsonl(tmp_path / "g.jsonl", ROWS)
    report = evaluate("generic", data_file=data, methods="bm25,embedding", grounder=tiny_grounder, progress=False,
                      out=tmp_path / "run")
    assert report["n"] == 3
    bm25 = report["methods"]["bm25"]
    assert bm25["answer_n"] == 2  # the unanswerable question has no answer to find
    assert bm25["answer_recall"] == 1.0  # two short documents: the budget covers the answer sentence
    assert "no_evidence_accuracy" in bm25  # the file has an unanswerable row
    lines = (tmp_path / "run" / "examples.jsonl").read_text().splitlines()
    assert {json.loads(line)["example_id"] for line in lines} == {"q1", "q2", "q3"}

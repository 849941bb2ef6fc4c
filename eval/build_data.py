"""Build the evaluation data bundled in ``cfic/eval/data`` from the raw files (run once, commit the output).

    python -m cfic.eval.build_data [--raw ../shared/data/raw]

Outputs compact gzipped JSON lines (gzip mtime 0, so rebuilding gives identical bytes), ``ATTRIBUTION.md``
and the licence texts that came with the raw files. What each file holds:

* ``nq.jsonl.gz`` — all 2,000 nq-open-oracle records in their own layout (minus fields we never use), plus
  ``cfic_split`` (``eval``/``train``/``held-out``) and ``cfic_eval_rank``. The eval split is
  ``NQ_EVAL_SIZE`` questions drawn with a fixed seed (``NQ_SPLIT_SEED``) among records whose long answer has
  at most ``MAX_PASSAGE_WORDS`` words and contains a locatable short answer. Records whose long answer shares
  a sentence with an eval record's passages are ``held-out`` (neither eval nor train). Documents are
  assembled at load time (see ``datasets``).
* ``hotpotqa.jsonl.gz`` — eval: the HotpotQA dev-distractor examples of the Meve sample and of the AMOR dev
  file (disjoint), 10 paragraphs each; train: the HippoRAG train-split sample. Documents and gold spans are
  fixed here.
* ``squad_docs.jsonl.gz`` + ``squad.jsonl.gz`` — three SQuAD 2.0 articles (Normans: eval; Rhine and the train
  file's article: train),
  each joined into one document, and their 1,124 unique questions (unanswerable ones included, with no gold).
* ``nq_long_docs.jsonl.gz`` + ``nq_long.jsonl.gz`` — L-Eval's 21 full NQ Wikipedia pages (HTML-ish tags
  turned into line breaks) and their 109 questions; no gold sentences exist for them, so only answer recall
  applies.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cfic.eval.datasets import (
    DATA_DIR,
    MAX_PASSAGE_WORDS,
    NQ_EVAL_SIZE,
    PASSAGE_SEPARATOR,
    nq_gold_sentences,
    passage_text,
    read_nq_file,
    record_sentence_keys,
    sentence_keys,
)
from cfic.eval.metrics import contains_answer
from cfic.text import split_sentences

NQ_SPLIT_SEED = "cfic-nq-eval-v1"
DEFAULT_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"

SOURCES = {
    "nq": ("nelson-liu/lost-in-the-middle", "29b8a6d0", "qa_data/nq-open-oracle.jsonl.gz"),
    "hotpot-meve": ("nakulbh/Meve-framework", "a83b659f", "data/hotpot_dev_distractor_v1.json (first 100)"),
    "hotpot-amor": ("JianGuanTHU/AMOR", "f950e63d", "data/hotpotqa/dev.json"),
    "hotpot-hipporag": ("OSU-NLP-Group/HippoRAG", "3d95d255", "data/hotpotqa_train.json (sample of 100)"),
    "squad": ("appcoreopc/squad2controlled", "d3ba9161", "dev-v2.0 / train-v2.0 subsets (every article)"),
    "leval": ("OpenLMLab/LEval", "cd34b050", "LEval-data/Open-ended-tasks/natural_question.jsonl"),
}


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Deterministic gzip (no timestamp, no file name) so a rebuild is byte-identical."""
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
            count += 1
    path.write_bytes(buffer.getvalue())
    return count


# ----------------------------------------------------------------------------------------------------------


def build_nq(raw: Path, out: Path) -> dict[str, int]:
    records = read_nq_file(raw / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz")

    def passage_key(i: int) -> str:
        return " ".join(records[i].long_answer.split())

    eligible = [
        i for i, r in enumerate(records)
        if len(r.long_answer.split()) <= MAX_PASSAGE_WORDS
        and nq_gold_sentences(r.long_answer, r.short_answers, r.answers)
    ]
    random.Random(NQ_SPLIT_SEED).shuffle(eligible)
    eval_ids = eligible[:NQ_EVAL_SIZE]
    rank = {i: n for n, i in enumerate(eval_ids)}
    eval_passages = {passage_key(i) for i in eval_ids}
    eval_sentences = record_sentence_keys(records, eval_ids)
    split = {}
    for i in range(len(records)):
        if i in rank:
            split[i] = "eval"
        elif passage_key(i) in eval_passages or sentence_keys(records[i].long_answer) & eval_sentences:
            split[i] = "held-out"
        else:
            split[i] = "train"
    rows = []
    for i, r in enumerate(records):
        row: dict[str, Any] = {
            "question": r.question,
            "answers": list(r.answers),
            "ctxs": [{"title": t, "text": x} for t, x in r.contexts],
            "nq_annotated_gold": {"title": r.title, "long_answer": r.long_answer,
                                  "short_answers": list(r.short_answers)},
            "cfic_split": split[i],
        }
        if i in rank:
            row["cfic_eval_rank"] = rank[i]
        rows.append(row)
    write_jsonl_gz(out / "nq.jsonl.gz", rows)
    counts = {s: sum(1 for v in split.values() if v == s) for s in ("eval", "train", "held-out")}
    counts["eligible"] = len(eligible)
    return counts


# ----------------------------------------------------------------------------------------------------------


def hotpot_document(paragraphs: list[tuple[str, list[str]]], facts: list[tuple[str, int]]
                    ) -> tuple[str, list[list[int]], int]:
    """Join paragraphs as ``Title: t\\n<sentences>``; return (document, gold spans, facts not found)."""
    pieces: list[str] = []
    offsets: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    for title, sentences in paragraphs:
        head = passage_text(title, "")
        text_start = pos + len(head)
        body = "".join(sentences)
        lead = len(body) - len(body.lstrip())
        body = body.strip()
        spans = []
        cursor = text_start - lead
        for sentence in sentences:
            a = cursor + (len(sentence) - len(sentence.lstrip()))
            b = cursor + len(sentence.rstrip())
            spans.append((a, b))
            cursor += len(sentence)
        offsets.setdefault(title, spans)
        piece = head + body
        pieces.append(piece)
        pos += len(piece) + len(PASSAGE_SEPARATOR)
    document = PASSAGE_SEPARATOR.join(pieces)
    gold, missing = [], 0
    for title, sid in facts:
        spans = offsets.get(title)
        if spans is None or not 0 <= sid < len(spans) or spans[sid][1] <= spans[sid][0]:
            missing += 1
            continue
        gold.append(list(spans[sid]))
    gold = sorted({tuple(g) for g in gold})
    for a, b in gold:
        assert document[a:b].strip() == document[a:b] and b > a
    return document, [list(g) for g in gold], missing


def _hotpot_answers(answer: str) -> list[str]:
    # Yes/no comparison answers never appear as such in evidence: answer recall does not apply to them.
    return [] if answer.strip().lower() in ("yes", "no") else [answer]


def build_hotpot(raw: Path, out: Path) -> dict[str, int]:
    rows: list[dict[str, Any]] = []
    missing = skipped = 0
    meve = json.loads((raw / "hotpotqa-meve-sample" / "hotpot_dev_distractor_v1.sample100.json").read_text())
    for i, ex in enumerate(meve):
        paragraphs = list(zip(ex["context"]["title"], ex["context"]["sentences"], strict=True))
        if len(paragraphs) != 10:
            skipped += 1
            continue
        facts = list(zip(ex["supporting_facts"]["title"], ex["supporting_facts"]["sent_id"], strict=True))
        document, gold, miss = hotpot_document(paragraphs, facts)
        missing += miss
        rows.append({"id": f"hotpot-meve-{i}", "split": "eval", "question": ex["question"],
                     "answers": _hotpot_answers(ex["answer"]), "document": document, "gold": gold,
                     "type": ex.get("type"), "level": ex.get("level")})
    for line in (raw / "hotpotqa-amor" / "dev.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        ex = json.loads(line)
        paragraphs = [(t, s) for t, s in ex["context"]]
        if len(paragraphs) != 10:
            skipped += 1
            continue
        facts = [(f[0], sid) for f in ex["supporting_facts"] for sid in f[1]]
        document, gold, miss = hotpot_document(paragraphs, facts)
        missing += miss
        rows.append({"id": f"hotpot-{ex['_id']}", "split": "eval", "question": ex["question"],
                     "answers": _hotpot_answers(ex["answer"]), "document": document, "gold": gold,
                     "type": ex.get("type"), "level": ex.get("level")})
    n_eval = len(rows)
    hippo = json.loads((raw / "hipporag-samples" / "hotpotqa_train_sample.json").read_text())
    for i, ex in enumerate(hippo):
        paragraphs = [(t, s) for t, s in ex["context"]]
        facts = [(t, sid) for t, sid in ex["supporting_facts"]]
        document, gold, miss = hotpot_document(paragraphs, facts)
        missing += miss
        rows.append({"id": f"hotpot-train-{ex.get('_id', i)}", "split": "train", "question": ex["question"],
                     "answers": _hotpot_answers(ex["answer"]), "document": document, "gold": gold,
                     "type": ex.get("type"), "level": ex.get("level")})
    eval_questions = {r["question"] for r in rows if r["split"] == "eval"}
    assert not any(r["question"] in eval_questions for r in rows if r["split"] == "train")
    write_jsonl_gz(out / "hotpotqa.jsonl.gz", rows)
    return {"eval": n_eval, "train": len(rows) - n_eval, "skipped_not_10_paragraphs": skipped,
            "missing_facts": missing}


# ----------------------------------------------------------------------------------------------------------


def build_squad(raw: Path, out: Path) -> dict[str, int]:
    articles: dict[str, list[dict[str, Any]]] = {}
    for name in ("dev-v2.0.subset.json", "train-v2.0.subset.json"):
        for article in json.loads((raw / "squad2-subset" / name).read_text())["data"]:
            if article["title"] in articles:
                known = [p["context"] for p in articles[article["title"]]]
                if known != [p["context"] for p in article["paragraphs"]]:
                    raise SystemExit(f"two different versions of SQuAD article {article['title']}")
                continue
            articles[article["title"]] = article["paragraphs"]
    docs, rows, seen = [], [], set()
    for title, paragraphs in articles.items():
        head = passage_text(title.replace("_", " "), "")
        starts, pos = [], len(head)
        for p in paragraphs:
            starts.append(pos)
            pos += len(p["context"]) + len(PASSAGE_SEPARATOR)
        document = head + PASSAGE_SEPARATOR.join(p["context"] for p in paragraphs)
        sentences = split_sentences(document)
        docs.append({"doc_id": title, "text": document})
        for p, start in zip(paragraphs, starts, strict=True):
            assert document[start : start + len(p["context"])] == p["context"]
            for qa in p["qas"]:
                if qa["id"] in seen:
                    continue
                seen.add(qa["id"])
                answerable = not qa.get("is_impossible", False)
                spans = []
                for ans in qa["answers"] if answerable else []:
                    a = start + ans["answer_start"]
                    b = a + len(ans["text"])
                    if document[a:b] != ans["text"]:
                        raise SystemExit(f"SQuAD answer offset mismatch in {qa['id']}")
                    spans.append((a, b))
                gold = sorted({(s.start, s.end) for s in sentences for a, b in spans
                               if s.start < b and s.end > a})
                answers = list(dict.fromkeys(ans["text"] for ans in qa["answers"])) if answerable else []
                rows.append({"id": f"squad-{qa['id']}", "doc_id": title, "question": qa["question"].strip(),
                             "answers": answers, "answerable": answerable, "gold": [list(g) for g in gold]})
    write_jsonl_gz(out / "squad_docs.jsonl.gz", docs)
    write_jsonl_gz(out / "squad.jsonl.gz", rows)
    return {"documents": len(docs), "questions": len(rows),
            "unanswerable": sum(1 for r in rows if not r["answerable"])}


# ----------------------------------------------------------------------------------------------------------

_BLOCK_TAG = re.compile(r"</?(?:H\d|P|Table|Tr|Ul|Ol|Li|Dl|Dd|Dt)\b[^>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:_[^>]*)?>")


def clean_leval_page(text: str) -> str:
    """L-Eval pages keep NQ's HTML-ish markup (``<P>``, ``<Tr>``, ``<Li>``...). Block tags become line breaks
    (so each paragraph, list item and table row is its own line), other tags (cells) become spaces."""
    text = _BLOCK_TAG.sub("\n", text)
    text = _ANY_TAG.sub(" ", text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def build_nq_long(raw: Path, out: Path) -> dict[str, int]:
    docs, rows = [], []
    verbatim = 0
    for d, line in enumerate((raw / "leval" / "natural_question.jsonl").read_text().splitlines()):
        if not line.strip():
            continue
        ex = json.loads(line)
        doc_id = f"leval-nq-{d}"
        text = clean_leval_page(ex["input"])
        docs.append({"doc_id": doc_id, "text": text})
        for q, (question, answer) in enumerate(zip(ex["instructions"], ex["outputs"], strict=True)):
            verbatim += contains_answer(text, [answer])
            rows.append({"id": f"{doc_id}-{q}", "doc_id": doc_id, "question": question.strip(),
                         "answers": [answer], "gold": []})
    write_jsonl_gz(out / "nq_long_docs.jsonl.gz", docs)
    write_jsonl_gz(out / "nq_long.jsonl.gz", rows)
    return {"documents": len(docs), "questions": len(rows), "answer_in_document": verbatim}


# ----------------------------------------------------------------------------------------------------------

ATTRIBUTION_HEAD = """# Bundled evaluation data: sources, licences, attribution

Built by `python -m cfic.eval.build_data` from the raw files listed below (each taken from a public GitHub
repository at the stated commit). The processing is described in `cfic/eval/build_data.py` and
`cfic/eval/datasets.py`: records were selected, re-laid out and (for L-Eval) had their HTML-ish tags turned
into line breaks; no text was otherwise changed. The redistributed data keeps the licence of its source.

"""

ATTRIBUTION_ROWS = (
    ("`nq.jsonl.gz`", "nq",
     "Natural Questions (NQ-open dev questions, annotated long answers), Kwiatkowski et al. 2019; "
     "Lee et al. 2019; Liu et al. 2023 (*Lost in the Middle*)",
     "NQ data: CC BY-SA 3.0; the lost-in-the-middle repository: MIT (`LICENSE-lost-in-the-middle.txt`)"),
    ("`hotpotqa.jsonl.gz` (eval)", "hotpot-meve;hotpot-amor",
     "HotpotQA dev (distractor setting), Yang et al. 2018",
     "CC BY-SA 4.0 (Meve-framework states MIT for its repository; AMOR states no licence)"),
    ("`hotpotqa.jsonl.gz` (train)", "hotpot-hipporag", "HotpotQA train",
     "CC BY-SA 4.0 (HippoRAG repository: MIT)"),
    ("`squad_docs.jsonl.gz`, `squad.jsonl.gz`", "squad",
     "SQuAD 2.0 articles *Normans* (dev file: eval split), *Rhine* (dev file: train split since issue 29) and "
     "*Computational complexity theory* (train file: train split), Rajpurkar et al. 2018",
     "CC BY-SA 4.0"),
    ("`nq_long_docs.jsonl.gz`, `nq_long.jsonl.gz`", "leval",
     "L-Eval (An et al. 2023) built on Natural Questions",
     "L-Eval repository: GPL-3.0 (`LICENSE-LEval-GPL-3.0.txt`); the NQ text: CC BY-SA 3.0"),
)

ATTRIBUTION_TAIL = """
Licence texts: CC BY-SA 3.0 <https://creativecommons.org/licenses/by-sa/3.0/legalcode>,
CC BY-SA 4.0 <https://creativecommons.org/licenses/by-sa/4.0/legalcode>. The MIT and GPL-3.0 texts that came
with the raw files are copied next to this file. Wikipedia text is by Wikipedia contributors (CC BY-SA).

Counts at build time: {counts}
"""


def attribution(counts: dict[str, Any]) -> str:
    def src(key: str) -> str:
        repo, commit, path = SOURCES[key]
        return f"[{repo}](https://github.com/{repo}) @ `{commit}`: `{path}`"

    lines = ["| bundled file | source repository @ commit: path | underlying dataset | licence |",
             "|---|---|---|---|"]
    for file, keys, dataset, licence in ATTRIBUTION_ROWS:
        lines.append(f"| {file} | {'; '.join(src(k) for k in keys.split(';'))} | {dataset} | {licence} |")
    return ATTRIBUTION_HEAD + "\n".join(lines) + "\n" + ATTRIBUTION_TAIL.format(counts=json.dumps(counts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="the raw data folder (read only)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write the bundled files")
    args = parser.parse_args(argv)
    raw, out = args.raw, args.out
    if not (raw / "README.md").is_file():
        raise SystemExit(f"{raw} does not look like the raw data folder (no README.md)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "nq": build_nq(raw, out),
        "hotpotqa": build_hotpot(raw, out),
        "squad": build_squad(raw, out),
        "nq-long": build_nq_long(raw, out),
    }
    shutil.copyfile(raw / "lost-in-the-middle" / "LICENSE", out / "LICENSE-lost-in-the-middle.txt")
    shutil.copyfile(raw / "leval" / "LICENSE", out / "LICENSE-LEval-GPL-3.0.txt")

    (out / "ATTRIBUTION.md").write_text(attribution(counts))
    for name, value in counts.items():
        print(f"{name}: {value}")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

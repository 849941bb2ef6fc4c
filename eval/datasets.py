"""Evaluation examples: a question, the document(s) to ground it in, the answers and the gold sentence spans.

Everything is read from the files bundled in ``cfic/eval/data`` (built by ``python -m
cfic.eval.build_data``), or from a user's ``--data-file``; nothing outside the package is read at run time.

NQ documents are assembled at load time (so ``--k`` and ``--seed`` can change them): the annotated long
answer is the gold passage, placed at a seeded random position among K-1 distractor passages. Distractors
are the pool passages (every context passage and long answer in the same file, at most ``MAX_PASSAGE_WORDS``
words) ranked by BM25 against the question, skipping any passage that contains one of the question's
answers, any passage that came from the question's own record, and any second passage from the same source
record (a record's context passage and its long answer are near duplicates). Passages read ``Title:
<title>\\n<text>`` and are separated by a blank line.

Splits: each dataset has a fixed ``eval`` split. For NQ it is a seeded selection of ``NQ_EVAL_SIZE``
questions made once by ``build_data`` and stored in the bundled file; the other questions form the ``train``
split. No train question's gold passage shares a sentence with any eval record's passages (those records are
``held-out``), and training documents draw distractors only from train-side passages that share no sentence
with eval passages, so no eval text ever appears in training documents. HotpotQA's ``train`` split is a
separate train-set sample. SQuAD's ``train`` split is the article that comes from SQuAD's own train file
(``SQUAD_LORA_ARTICLE``, the only one the shipped LoRA, prior and attention ranker were fitted on) and the Rhine
dev-file article (``SQUAD_TRAIN_ARTICLES``; moved to the training side for the abstention fit, issue 29, before any
reported figure used it: every SQuAD evaluation so far read the first questions, all on the Normans article); the
``eval`` split is the Normans article (208 questions).

``hotpotqa-bridge`` is the multi-hop set: HotpotQA's *bridge* questions (the answer sits in a second paragraph that
only an entity named in the first one leads to), both splits, scored by answer recall. (No MuSiQue-style 2-4 hop set
could be bundled: none is among the raw files this project may redistribute.)
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cfic.errors import CficError, require_positive_int
from cfic.eval.generic import Example, examples_from_table
from cfic.eval.metrics import contains_answer
from cfic.text import split_sentences

DATA_DIR = Path(__file__).resolve().parent / "data"
DATASETS = ("nq", "hotpotqa", "hotpotqa-bridge", "squad", "nq-long", "generic")
DEFAULT_K = 20
NQ_EVAL_SIZE = 300
MAX_PASSAGE_WORDS = 250
PASSAGE_SEPARATOR = "\n\n"
SQUAD_LORA_ARTICLE = "Computational_complexity_theory"
# Rhine second: a second article lets the abstention fit hold a whole article out (SQuAD 2.0's unanswerable
# questions are written against their article, so a probe fitted and scored within one article learns its topic).
SQUAD_TRAIN_ARTICLES = (SQUAD_LORA_ARTICLE, "Rhine")


def passage_text(title: str, text: str) -> str:
    return f"Title: {title}\n{text}"


# ----------------------------------------------------------------------------------------------------------
# Reading JSON lines with line numbers in every error
# ----------------------------------------------------------------------------------------------------------


def _open_data_file(path: Path) -> IO[str]:
    """``path`` opened as text, gunzipped when it starts with the gzip magic; the caller closes it. Opening is the
    check (a missing file or a folder is one clear error, with no window between a check and the open)."""
    what = f"data file {str(path)!r}"
    try:
        with path.open("rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        return gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CficError(f"{what} does not exist") from exc
    except IsADirectoryError as exc:
        raise CficError(f"{what} is a directory") from exc
    except OSError as exc:
        raise CficError(f"cannot read {what}: {exc.strerror or exc}") from exc


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    with _open_data_file(path) as handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):  # noqa: B007 (used in the except below)
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CficError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        except UnicodeDecodeError as exc:
            raise CficError(f"{path}:{lineno + 1}: not UTF-8 text") from exc
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
            raise CficError(f"{path}:{lineno + 1}: cannot read ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# NQ (lost-in-the-middle nq-open-oracle layout)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NQRecord:
    """One line of an ``nq-open-oracle.jsonl`` file. ``split``/``rank`` are only set in the bundled file."""

    line: int
    question: str
    answers: tuple[str, ...]
    short_answers: tuple[str, ...]
    title: str
    long_answer: str
    contexts: tuple[tuple[str, str], ...]
    split: str | None = None
    rank: int | None = None


def _str_list(value: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CficError(f"{where}: {what} must be a list of strings")
    return tuple(value)


def parse_nq_record(obj: Any, where: str, line: int) -> NQRecord:
    """Validate one oracle record; ``where`` (``path:line``) starts every error message."""
    if not isinstance(obj, dict):
        raise CficError(f"{where}: expected a JSON object")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise CficError(f"{where}: 'question' must be a non-empty string")
    answers = _str_list(obj.get("answers"), "'answers'", where)
    if not any(a.strip() for a in answers):
        raise CficError(f"{where}: 'answers' must hold at least one non-empty answer")
    gold = obj.get("nq_annotated_gold")
    if not isinstance(gold, dict):
        raise CficError(f"{where}: 'nq_annotated_gold' must be an object (title, long_answer, short_answers)")
    long_answer = gold.get("long_answer")
    if not isinstance(long_answer, str) or not long_answer.strip():
        raise CficError(f"{where}: 'nq_annotated_gold.long_answer' must be a non-empty string")
    title = gold.get("title", "")
    if not isinstance(title, str):
        raise CficError(f"{where}: 'nq_annotated_gold.title' must be a string")
    short = _str_list(gold.get("short_answers", []), "'nq_annotated_gold.short_answers'", where)
    ctxs = obj.get("ctxs", [])
    if not isinstance(ctxs, list):
        raise CficError(f"{where}: 'ctxs' must be a list")
    contexts = []
    for j, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise CficError(f"{where}: ctxs[{j}] must be an object with a 'text' string")
        ctx_title = ctx.get("title", "")
        if not isinstance(ctx_title, str):
            raise CficError(f"{where}: ctxs[{j}].title must be a string")
        contexts.append((ctx_title, ctx["text"]))
    split = obj.get("cfic_split")
    rank = obj.get("cfic_eval_rank")
    return NQRecord(line, question.strip(), answers, short, title, long_answer, tuple(contexts),
                    split if isinstance(split, str) else None, rank if isinstance(rank, int) else None)


def read_nq_file(path: str | Path) -> list[NQRecord]:
    records = [parse_nq_record(obj, f"{path}:{lineno}", lineno) for lineno, obj in read_jsonl(path)]
    if not records:
        raise CficError(f"data file {str(path)!r} holds no records")
    return records


def nq_gold_sentences(long_answer: str, short_answers: Sequence[str], answers: Sequence[str]
                      ) -> list[tuple[int, int]]:
    """Character spans (into ``long_answer``) of its sentences that contain a short answer.

    Falls back to the NQ-open answers, then to the sentences overlapping a raw case-insensitive occurrence of
    an answer (an answer cut by a sentence boundary). Empty when the answer cannot be found at all.
    """
    sentences = split_sentences(long_answer)
    for candidates in (short_answers, answers):
        spans = [(s.start, s.end) for s in sentences if contains_answer(s.text, candidates)]
        if spans:
            return spans
    lowered = long_answer.lower()
    hits: set[tuple[int, int]] = set()
    for answer in (*short_answers, *answers):
        needle = answer.strip().lower()
        pos = lowered.find(needle) if needle else -1
        while pos >= 0:
            hits.update((s.start, s.end) for s in sentences if s.start < pos + len(needle) and s.end > pos)
            pos = lowered.find(needle, pos + 1)
    return sorted(hits)


@dataclass(frozen=True)
class _Passage:
    title: str
    text: str
    groups: frozenset[int]

    @property
    def full(self) -> str:
        return passage_text(self.title, self.text)


def sentence_keys(text: str) -> set[str]:
    """Whitespace- and case-normalised sentences of ``text``: passages from the same Wikipedia page overlap
    without being equal, so sentence overlap is what decides whether two passages share text."""
    return {" ".join(s.text.split()).lower() for s in split_sentences(text)}


def record_sentence_keys(records: Sequence[NQRecord], members: Sequence[int]) -> set[str]:
    keys: set[str] = set()
    for i in members:
        for text in (records[i].long_answer, *(t for _, t in records[i].contexts)):
            keys |= sentence_keys(text)
    return keys


def _build_pool(records: Sequence[NQRecord], members: Sequence[int], exclude: set[str] | frozenset[str] = frozenset()
                ) -> list[_Passage]:
    """Unique passages (context passages and long answers) of the given records, with their source records;
    passages sharing a sentence with ``exclude`` are left out."""
    seen: dict[tuple[str, str], int] = {}
    pool: list[tuple[str, str, set[int]]] = []
    for i in members:
        rec = records[i]
        for title, text in ((rec.title, rec.long_answer), *rec.contexts):
            if not text.strip() or len(text.split()) > MAX_PASSAGE_WORDS:
                continue
            if exclude and sentence_keys(text) & exclude:
                continue
            key = (title, " ".join(text.split()))
            if key in seen:
                pool[seen[key]][2].add(i)
            else:
                seen[key] = len(pool)
                pool.append((title, text.strip(), {i}))
    return [_Passage(t, x, frozenset(g)) for t, x, g in pool]


def build_nq_examples(
    records: Sequence[NQRecord],
    selected: Sequence[int],
    pool_members: Sequence[int],
    *,
    k: int = DEFAULT_K,
    seed: int = 0,
    id_prefix: str = "nq",
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Example]:
    """Documents of K passages for ``records[i]`` (i in ``selected``), distractors from ``pool_members``."""
    from cfic.retrieval.bm25 import BM25

    require_positive_int("--k", k)
    pool = _build_pool(records, pool_members, exclude)
    need = k - 1
    ranked: list[list[int]] = [[] for _ in selected]
    if need and pool:
        bm25 = BM25([f"{p.title} {p.text}" for p in pool])
        ranked = bm25.rank([records[i].question for i in selected], min(len(pool), max(4 * k, k + 50)))
    examples = []
    for row, i in zip(ranked, selected, strict=True):
        rec = records[i]
        answers = tuple(dict.fromkeys((*rec.answers, *rec.short_answers)))
        distractors: list[_Passage] = []
        used: set[int] = {i}

        def take(candidates: Sequence[int], answers=answers, used=used, distractors=distractors) -> None:
            for j in candidates:
                if len(distractors) >= need:
                    return
                p = pool[j]
                if p.groups & used or contains_answer(p.full, answers) or p in distractors:
                    continue
                distractors.append(p)
                used.update(p.groups)

        take(row)
        if len(distractors) < need and pool:  # rare: most of the top of the ranking was filtered out
            take(bm25.rank([rec.question], len(pool))[0])
        position = random.Random(f"{seed}:{rec.question}").randrange(len(distractors) + 1)
        gold_passage = passage_text(rec.title, rec.long_answer)
        passages = [p.full for p in distractors]
        passages.insert(position, gold_passage)
        document = PASSAGE_SEPARATOR.join(passages)
        offset = sum(len(p) + len(PASSAGE_SEPARATOR) for p in passages[:position])
        offset += len(gold_passage) - len(rec.long_answer)
        gold = tuple((0, offset + a, offset + b)
                     for a, b in nq_gold_sentences(rec.long_answer, rec.short_answers, rec.answers))
        ex_id = f"{id_prefix}-{rec.line}"
        examples.append(Example(ex_id, rec.question, answers, (document,), gold, True,
                                f"{ex_id}:k{k}:s{seed}"))
    return examples


def _nq_bundled(split: str, k: int, seed: int) -> list[Example]:
    records = read_nq_file(DATA_DIR / "nq.jsonl.gz")
    everyone = list(range(len(records)))
    if split == "eval":
        chosen = sorted((i for i, r in enumerate(records) if r.split == "eval"),
                        key=lambda i: records[i].rank or 0)
        return build_nq_examples(records, chosen, everyone, k=k, seed=seed)
    chosen = [i for i, r in enumerate(records) if r.split == "train"]
    held = record_sentence_keys(records, [i for i, r in enumerate(records) if r.split == "eval"])
    return build_nq_examples(records, chosen, chosen, k=k, seed=seed, exclude=held)


# ----------------------------------------------------------------------------------------------------------
# Pre-built datasets (documents and gold spans are fixed at build time)
# ----------------------------------------------------------------------------------------------------------


def _prebuilt(name: str, split: str, kind: str | None = None) -> list[Example]:
    """The bundled ``name`` examples of ``split``; ``kind``: only those of that HotpotQA question type."""
    docs: dict[str, str] = {}
    docs_file = DATA_DIR / f"{name}_docs.jsonl.gz"
    if docs_file.exists():
        docs = {obj["doc_id"]: obj["text"] for _, obj in read_jsonl(docs_file)}
    examples = []
    for _, obj in read_jsonl(DATA_DIR / f"{name}.jsonl.gz"):
        side = obj.get("split") or ("train" if name == "squad" and obj["doc_id"] in SQUAD_TRAIN_ARTICLES else "eval")
        if side != split or (kind is not None and obj.get("type") != kind):
            continue
        text = obj["document"] if "document" in obj else docs[obj["doc_id"]]
        key = obj.get("doc_id", obj["id"])
        examples.append(Example(
            id=obj["id"], question=obj["question"], answers=tuple(obj["answers"]), documents=(text,),
            gold=tuple((0, a, b) for a, b in obj["gold"]), answerable=bool(obj.get("answerable", True)),
            doc_key=f"{name}:{key}"))
    if name == "squad" and split == "train":  # article by article, the LoRA's first (``limit`` keeps it)
        examples.sort(key=lambda ex: SQUAD_TRAIN_ARTICLES.index(ex.doc_key.split(":", 1)[1]))
    return examples


_SPLITS = {"nq": ("eval", "train"), "hotpotqa": ("eval", "train"), "hotpotqa-bridge": ("eval", "train"),
           "squad": ("eval", "train"), "nq-long": ("eval",), "generic": ("eval",)}


def load_split(
    dataset: str = "nq",
    split: str = "eval",
    *,
    k: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    data_file: str | Path | None = None,
) -> list[Example]:
    """Examples of one dataset split, in a fixed order; ``limit`` keeps the first ``limit``.

    ``data_file`` evaluates a user's file: with ``dataset="generic"`` any file in the generic schema
    (:mod:`cfic.eval.generic`, read through ``datasets``); with ``dataset="nq"`` a file in the nq-open-oracle layout,
    every record in file order with distractors drawn from that file's own passages.
    """
    if dataset not in DATASETS:
        raise CficError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in _SPLITS[dataset]:
        raise CficError(f"dataset {dataset!r} has no {split!r} split; it has {', '.join(_SPLITS[dataset])}")
    if limit is not None:
        require_positive_int("--limit", limit)
    if k is not None and dataset != "nq":
        raise CficError("--k (passages per document) applies to --dataset nq only")
    if dataset == "generic":
        if data_file is None:
            raise CficError("--dataset generic needs --data-file (a file in the generic schema, see README)")
        from cfic.eval.tables import load_table

        examples = examples_from_table(load_table(data_file))
        return examples[:limit] if limit else examples
    if data_file is not None and dataset != "nq":
        raise CficError("--data-file takes the generic schema (--dataset generic) or NQ-format files "
                        "(nq-open-oracle layout, --dataset nq)")
    k = DEFAULT_K if k is None else k
    if data_file is not None:
        records = read_nq_file(data_file)
        chosen = list(range(len(records)))[: limit or None]
        return build_nq_examples(records, chosen, list(range(len(records))), k=k, seed=seed, id_prefix="line")
    if dataset == "nq":
        examples = _nq_bundled(split, k, seed)
    elif dataset == "hotpotqa-bridge":  # the multi-hop set: bridge questions (answer in a second paragraph)
        examples = _prebuilt("hotpotqa", split, kind="bridge")
    else:
        examples = _prebuilt(dataset.replace("-", "_"), split)
    return examples[:limit] if limit else examples

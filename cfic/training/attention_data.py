"""Training-side material for the attention ranker: for each question, the question pass's attention over every
sentence (:class:`~cfic.decoding.attention.SentenceAttention`, with the question and with a content-free one), the
sentence prior's log prior and which sentences are evidence. Written one ``.npz`` per question into a folder, so an
interrupted collection resumes where it stopped; only training splits are read (NQ train, HotpotQA train, the
answerable SQuAD questions of the LoRA's article held out of LoRA training, and the answerable questions of the
second SQuAD training article, which no fit before the attention ranker saw).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfic.attention import CONTENT_FREE_QUESTION


@dataclass(frozen=True)
class AttentionItem:
    """One question's material (arrays over the document's sentences; attention ``[2, layers, heads, sentences]``
    with row 0 from the question's last token and row 1 averaged over its tokens)."""

    source: str
    attention: np.ndarray
    null_attention: np.ndarray
    tokens: np.ndarray
    log_prior: np.ndarray
    evidence: np.ndarray  # bool: gold sentence or answer-bearing sentence
    answer: np.ndarray  # bool: holds one of the answers
    group: str = ""  # the document's key: questions on one article share it (cross-validation folds by it)


def training_examples(n_nq: int, n_hotpot: int, n_squad: int, nq_offset: int = 460,
                      n_squad_second: int = 400) -> list[tuple[str, Any]]:
    """(source, Example) pairs from the training splits only. NQ starts after the questions ``cfic fit-prior``
    fits on (``nq_offset``), so the two fits see different questions. SQuAD: the LoRA article's held-out questions,
    then up to ``n_squad_second`` of every other training article's (the LoRA, the prior and the calibration never
    read those, so a fold holding one out measures the ranker on an article nothing was fitted on)."""
    from cfic.eval import load_split
    from cfic.eval.datasets import SQUAD_LORA_ARTICLE
    from cfic.training.calibration import calibration_examples
    from cfic.training.lora import TrainSettings

    out = [("nq", ex) for ex in load_split("nq", "train")[nq_offset: nq_offset + n_nq]]
    out += [("hotpotqa", ex) for ex in load_split("hotpotqa", "train")[:n_hotpot]]
    out += [("squad", ex) for ex in calibration_examples(TrainSettings()) if ex.answerable][:n_squad]
    others = [ex for ex in load_split("squad", "train")
              if ex.answerable and ex.doc_key != f"squad:{SQUAD_LORA_ARTICLE}"]
    out += [("squad", ex) for ex in others[:n_squad_second]]
    return out


def _labels(enc: Any, ex: Any) -> tuple[np.ndarray, np.ndarray]:
    from cfic.eval.metrics import contains_answer

    answer = np.array([contains_answer(s.text, ex.answers) for s in enc.sentences], dtype=bool)
    gold = np.zeros(len(enc.sentences), dtype=bool)
    for doc, a, b in ex.gold:
        if doc == 0:
            gold |= np.array([s.start < b and a < s.end for s in enc.sentences])
    return gold | answer, answer


def document_attention(grounder: Any, enc: Any, question: str) -> np.ndarray:
    """``[2, layers, heads, sentences]`` float32 over the whole document (a sentence in two windows: the first)."""
    import torch

    from cfic.decoding.encode import question_pass, window_segment_lengths

    cfg = grounder.config
    ids = grounder.template.query_ids(grounder.tokenizer, question, cfg.max_query_tokens)
    out = None
    with torch.inference_mode():
        for window in reversed(enc.windows):  # earlier windows overwrite: a sentence keeps its first window
            lengths = window_segment_lengths(enc, window)
            att = question_pass(grounder.runner, window, ids, 1, segment_lengths=lengths).attention
            both = torch.stack([att.last, att.mean]).numpy()
            if out is None:
                out = np.zeros((*both.shape[:3], len(enc.sentences)), dtype=np.float32)
            out[..., window.first: window.last] = both
    assert out is not None
    return out


def collect(folder: str | Path, examples: list[tuple[str, Any]], grounder: Any, progress: bool = True) -> Path:
    """Write each example's :class:`AttentionItem` as ``<folder>/<index>.npz`` (existing files are kept)."""
    from tqdm.auto import tqdm

    from cfic.prior import SentencePrior

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached: tuple[str, Any, np.ndarray] | None = None
    for i, (source, ex) in enumerate(tqdm(examples, desc="attention material", unit="q", disable=not progress)):
        path = folder / f"{i:05d}.npz"
        skipped = path.with_suffix(".skip")  # a question without evidence sentences: nothing to learn from
        if path.exists() or skipped.exists():
            continue
        key = ex.doc_key or ex.id
        if cached is None or cached[0] != key:
            enc = grounder.encode([ex.documents[0]])[0]
            cached = (key, enc, document_attention(grounder, enc, CONTENT_FREE_QUESTION))
        _, enc, null = cached
        evidence, answer = _labels(enc, ex)
        if not evidence.any():
            skipped.touch()
            continue
        signals = grounder._signals(ex.question, [enc])
        log_prior = SentencePrior.log_priors(signals, grounder.config.prior)[0]
        attention = document_attention(grounder, enc, ex.question)
        tokens = np.array([len(s) for s in enc.segment_ids], dtype=np.float32)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, source=source, group=key, attention=attention.astype(np.float16),
                            null_attention=null.astype(np.float16), tokens=tokens, log_prior=log_prior,
                            evidence=evidence, answer=answer)
        tmp.replace(path)
    return folder


def load(folder: str | Path) -> Iterator[AttentionItem]:
    for path in sorted(Path(folder).glob("[0-9]*.npz")):
        if ".tmp" in path.name:
            continue
        with np.load(path) as z:
            yield AttentionItem(str(z["source"]), z["attention"].astype(np.float32),
                                z["null_attention"].astype(np.float32), z["tokens"], z["log_prior"], z["evidence"],
                                z["answer"], str(z["group"]) if "group" in z else path.stem)

"""Paragraph question likelihood: the LM reads the prior's best paragraphs and says which one the question is about.

UPR (Sachan et al., 2022, "Improving Passage Retrieval with Zero-Shot Question Generation") ranks a passage by the
LM's log-likelihood of the question given the passage. Here it corrects the sentence prior before the constrained
start search: the ``paragraphs`` paragraphs holding the prior's best sentences (over all documents) are each read
with the question after them, in one batched forward, and every sentence's log prior gets
``weight * (z - max z)`` of its paragraph's standardised mean question log-probability (paragraphs not read get the
lowest read value); the adjusted priors are then normalised again over all sentences of all documents, so span
scores stay probabilities (the ranking, and best-first reading's bound on the adjusted priors, are unchanged by
that). The second hop (``hops=2``) ranks its hop query by the prior alone: it does not read again. The weight
was fitted on training questions only (``eval/results/train-query-likelihood``); the bundled adapter ships it
switched off (``enabled``): with the attention ranker already in the start search it bought +1 point of NQ answer
recall and lost 4.4 on HotpotQA, for an extra forward over up to 4 x 400 tokens per question (BENCHMARKS.md,
round 10). A paragraph longer than ``max_passage_tokens`` is read by its end (a document without blank lines is one
paragraph).

Why paragraphs and not the whole-document encoding: a question pass over the document conditions on all of it, so
its likelihood cannot say which paragraph made the question likely; a paragraph read alone can. The evidence still
comes from the constrained search over the whole-document encoding; this only re-weights where it may start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cfic.errors import CficError

PASSAGE_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
QUESTION_TEXT = " {question}"


@dataclass(frozen=True)
class QuestionLikelihood:
    """The fitted reading: ``weight`` on the standardised paragraph question log-likelihood, ``paragraphs`` read per
    question, each cut to its last ``max_passage_tokens`` tokens (with the prompt). ``enabled``: whether grounding
    reads by default (``ground(use_question_likelihood=...)`` decides per call); the bundled adapter ships it
    fitted but off — on the training side it did not earn its cost (BENCHMARKS.md, round 10)."""

    weight: float
    paragraphs: int = 8
    max_passage_tokens: int = 400
    enabled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight < 1e6:
            raise CficError(f"question_likelihood weight must be a number >= 0, got {self.weight!r}")
        for name in ("paragraphs", "max_passage_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CficError(f"question_likelihood {name} must be a positive integer, got {value!r}")
        if not isinstance(self.enabled, bool):
            raise CficError(f"question_likelihood enabled must be true or false, got {self.enabled!r}")

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuestionLikelihood:
        return cls(data["weight"], data.get("paragraphs", 8), data.get("max_passage_tokens", 400),
                   data.get("enabled", True))  # as written: __post_init__ rejects what is not a number / integer


def question_log_likelihoods(model: torch.nn.Module, tokenizer, passages: Sequence[str], question: str,
                             max_passage_tokens: int) -> np.ndarray:
    """Mean log p(question tokens | passage prompt) for each passage: one batched, right-padded forward."""
    q_ids = tokenizer(QUESTION_TEXT.format(question=question), add_special_tokens=False)["input_ids"]
    if not q_ids or not passages:
        return np.zeros(len(passages), dtype=np.float32)
    rows, starts = [], []
    for p in passages:
        p_ids = tokenizer(PASSAGE_PROMPT.format(passage=p), add_special_tokens=False)["input_ids"]
        p_ids = p_ids[-max_passage_tokens:]
        rows.append(p_ids + q_ids)
        starts.append(len(p_ids))
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), tokenizer.eos_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    n = len(q_ids)
    # Only the positions that predict a question token: a softmax over the whole vocabulary at every passage
    # position would cost more than the forward itself.
    rows_at = torch.arange(len(rows))[:, None]
    positions = torch.tensor(starts)[:, None] - 1 + torch.arange(n)[None, :]  # (passages, n): predicts start + i
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        picked = logits[rows_at.to(device), positions.to(device)].float()  # (passages, n, vocab)
        log_p = torch.log_softmax(picked, -1).gather(-1, torch.tensor(q_ids, device=device).expand(len(rows), n)[
            ..., None])[..., 0]
    return log_p.mean(-1).cpu().numpy().astype(np.float32)


def best_paragraphs(log_priors: Sequence[np.ndarray], paragraph_of: Sequence[np.ndarray], n: int
                    ) -> list[tuple[int, int]]:
    """(document, paragraph) of the ``n`` paragraphs with the highest best-sentence log prior, over all documents."""
    scored = []
    for d, (lp, para) in enumerate(zip(log_priors, paragraph_of, strict=True)):
        if not len(lp):
            continue
        best = np.full(int(para.max()) + 1, -np.inf)
        np.maximum.at(best, para, lp)
        scored += [(float(b), d, j) for j, b in enumerate(best) if np.isfinite(b)]
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(d, j) for _, d, j in scored[:n]]


def reading_terms(log_likelihoods: np.ndarray, read: Sequence[tuple[int, int]], paragraph_of: Sequence[np.ndarray],
                  weight: float) -> list[np.ndarray]:
    """Per document, each sentence's additive term ``weight * (z - max z)`` (<= 0) from its paragraph's question
    log-likelihood; sentences of paragraphs not read get the lowest read value."""
    ll = np.asarray(log_likelihoods, dtype=np.float64)
    z = (ll - ll.mean()) / (ll.std() + 1e-6) if len(ll) else ll
    z = z - (z.max() if len(z) else 0.0)
    floor = float(z.min()) if len(z) else 0.0
    per_paragraph = [np.full(int(para.max()) + 1 if len(para) else 0, floor) for para in paragraph_of]
    for (d, j), value in zip(read, z, strict=True):
        per_paragraph[d][j] = value
    return [(weight * values[para]).astype(np.float32) for values, para in zip(per_paragraph, paragraph_of,
                                                                               strict=True)]

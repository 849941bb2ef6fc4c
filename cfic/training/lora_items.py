"""The LoRA training data: (prompt, evidence + end) items built by the inference code's own prompt builder.

Prompts come from ``decoding.encode`` exactly as at inference; evidence is tokenised as the decoder sees it (first
sentence as emitted at the start of an answer, following sentences as they stand in the document), followed by the
end-of-sequence token, and the loss falls on those tokens only: what prefix decoding (first tokens) and skip decoding
(P(end) after each sentence) read. Unanswerable questions teach an immediate end.

Only the training side of the bundled data is read (``cfic.eval.load_split(..., "train")``), minus a stable share
of the SQuAD questions held out to calibrate the threshold (:func:`is_calibration_example`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainItem:
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # evidence tokens then end-of-evidence; the only tokens with a loss
    source: str


def gold_runs(sentences, gold: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive sentences that overlap a gold character span, as half-open index pairs."""
    hit = sorted({i for i, s in enumerate(sentences) for a, b in gold if s.start < b and a < s.end})
    runs: list[tuple[int, int]] = []
    for i in hit:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def build_items(tokenizer, template, config, examples, source: str, max_prompt_tokens: int,
                max_runs: int = 2) -> list[TrainItem]:
    """Training items for examples with one document each; a prompt that would need windowing is skipped."""
    from cfic.decoding.encode import plan_document

    items: list[TrainItem] = []
    eos = template.eos_ids[0]
    for ex in examples:
        if len(ex.documents) != 1:
            continue
        plan = plan_document(tokenizer, template, ex.documents[0], ex.id, {}, config, 10**9)
        q_ids = template.query_ids(tokenizer, ex.question, config.max_query_tokens)
        prompt = list(template.head_ids) + [t for seg in plan.segment_ids for t in seg] + q_ids
        if len(prompt) > max_prompt_tokens:
            continue
        if not ex.answerable:
            items.append(TrainItem(tuple(prompt), (eos,), source))
            continue
        runs = gold_runs(plan.sentences, [(a, b) for d, a, b in ex.gold if d == 0])
        for start, end in runs[:max_runs]:
            target = list(plan.answer_ids[start])
            for s in range(start + 1, end):
                target.extend(plan.segment_ids[s])
            items.append(TrainItem(tuple(prompt), (*target, eos), source))
    return items


def is_calibration_example(example_id: str, fraction: float) -> bool:
    """A stable, seed-independent share of the SQuAD training side that training never sees (threshold choice)."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def squad_lora_article(limit: int | None = None) -> list:
    """The SQuAD training-side questions of the article the shipped LoRA (and the prior and attention fits) used:
    the training side later gained a second article for the abstention fit only, and these recipes stay as run."""
    from cfic.eval import load_split
    from cfic.eval.datasets import SQUAD_LORA_ARTICLE

    return [ex for ex in load_split("squad", "train", limit=limit) if ex.doc_key == f"squad:{SQUAD_LORA_ARTICLE}"]


def squad_windows(examples, paragraphs: int, seed: int):
    """SQuAD articles are longer than a training prompt: each question gets ``paragraphs`` consecutive paragraphs
    (title line kept) that contain its gold sentences, or a seeded random run for an unanswerable question."""
    from cfic.eval.datasets import PASSAGE_SEPARATOR, Example

    rng = random.Random(seed)
    out = []
    for ex in examples:
        doc = ex.documents[0]
        head_end = doc.index("\n") + 1
        starts = [head_end]
        while (i := doc.find(PASSAGE_SEPARATOR, starts[-1])) != -1:
            starts.append(i + len(PASSAGE_SEPARATOR))
        ends = [s - len(PASSAGE_SEPARATOR) for s in starts[1:]] + [len(doc)]
        n = len(starts)
        if ex.gold:
            first = max(p for p in range(n) if starts[p] <= ex.gold[0][1])
            last = max(p for p in range(n) if starts[p] <= ex.gold[-1][1])
            if last - first + 1 > paragraphs:
                continue
            lo = rng.randint(max(0, last - paragraphs + 1), max(0, min(first, n - paragraphs)))
        else:
            lo = rng.randint(0, max(0, n - paragraphs))
        hi = min(n, lo + paragraphs) - 1
        shift = starts[lo] - head_end
        text = doc[:head_end] + doc[starts[lo]:ends[hi]]
        gold = tuple((0, a - shift, b - shift) for _, a, b in ex.gold)
        assert all(text[a:b] == doc[a + shift:b + shift] for _, a, b in gold)
        out.append(Example(ex.id, ex.question, ex.answers, (text,), gold, ex.answerable, f"{ex.doc_key}@{lo}"))
    return out


def training_items(tokenizer, template, config, settings: Any) -> list[TrainItem]:
    """All training-side items (minus the calibration hold-out), shuffled with the run's seed.

    ``settings``: a :class:`cfic.training.lora.TrainSettings`."""
    from cfic.eval import load_split

    rng = random.Random(settings.seed)
    limit = settings.max_examples
    nq = load_split("nq", "train", k=settings.nq_passages, seed=settings.seed, limit=limit)
    items = build_items(tokenizer, template, config, nq, "nq", settings.max_prompt_tokens)
    items += build_items(tokenizer, template, config, load_split("hotpotqa", "train", limit=limit), "hotpotqa",
                         settings.max_prompt_tokens)
    squad = [ex for ex in squad_lora_article(limit)
             if not is_calibration_example(ex.id, settings.calibration_fraction)]
    items += build_items(tokenizer, template, config, squad_windows(squad, settings.squad_paragraphs, settings.seed),
                         "squad", settings.max_prompt_tokens)
    rng.shuffle(items)
    return items


def item_tensors(item: TrainItem):
    """input ids and labels: the loss falls on the target tokens only (HF shifts labels inside the model)."""
    import torch

    ids = list(item.prompt_ids) + list(item.target_ids)
    labels = [-100] * len(item.prompt_ids) + list(item.target_ids)
    return torch.tensor([ids]), torch.tensor([labels])

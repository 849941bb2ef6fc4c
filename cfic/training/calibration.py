"""The adapter's default ``no_evidence`` threshold, chosen on training-side questions that LoRA training left out.

Why with the adapter: a score scale belongs to the weights that produced it, so the threshold is written into the
adapter's ``cfic.json`` and travels with it (``cfic.models.adapter_threshold`` reads it back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.files import write_atomic
from cfic.training.lora_items import is_calibration_example


def calibration_examples(settings: Any):
    """The SQuAD training-side questions that training left out, on the whole article (as ``cfic evaluate`` asks).

    ``settings``: a :class:`cfic.training.lora.TrainSettings` (its ``max_examples`` and ``calibration_fraction``)."""
    from cfic.training.lora_items import squad_lora_article

    return [ex for ex in squad_lora_article(settings.max_examples)
            if is_calibration_example(ex.id, settings.calibration_fraction)]


def choose_threshold(top_scores: list[float], answerable: list[bool]) -> dict[str, Any]:
    """The threshold that makes the most abstention decisions right (answer iff answerable); ties go to the lowest
    threshold (abstain as little as possible). A question is answered when its best span scores >= threshold."""
    if not top_scores:
        raise CficError("no calibration examples")
    candidates = sorted({0.0, *top_scores})
    n = len(top_scores)

    def accuracy(t: float) -> float:
        return sum((s >= t) == a for s, a in zip(top_scores, answerable, strict=True)) / n

    best = max(candidates, key=lambda t: (accuracy(t), -t))
    return {"threshold": best, "accuracy": accuracy(best), "accuracy_without_threshold": accuracy(0.0),
            "examples": n, "unanswerable": sum(not a for a in answerable)}


def calibrate(adapter: Path, settings: Any, progress: bool = True) -> dict[str, Any]:
    """Choose the adapter's default ``no_evidence`` threshold on the held-out training side; writes ``cfic.json``."""
    from tqdm.auto import tqdm

    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS

    examples = calibration_examples(settings)
    grounder = Grounder.from_pretrained(settings.model, dtype="float32", adapter=adapter, threshold=None)
    encodings: dict[str, Any] = {}
    scores, answerable = [], []
    for ex in tqdm(examples, desc="calibrate threshold", unit="q", disable=not progress):
        if ex.doc_key not in encodings:
            encodings[ex.doc_key] = grounder.encode(list(ex.documents))
        result = grounder.ground(ex.question, encodings[ex.doc_key])
        scores.append(max((e.score for e in result.evidence), default=0.0))
        answerable.append(ex.answerable)
    chosen = choose_threshold(scores, answerable)
    chosen["source"] = ("squad train split, questions held out of training "
                        "(cfic.training.lora_items.is_calibration_example)")
    write_atomic(Path(adapter) / ADAPTER_SETTINGS, json.dumps(chosen, indent=2) + "\n")
    return chosen

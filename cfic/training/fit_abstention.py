"""``cfic fit-abstention``: fit the answerability probe and the ``no_evidence`` threshold on the training side.

Training items (the evaluation splits are never read):

* every SQuAD 2.0 training-side question on its whole article (answerable and unanswerable: SQuAD's unanswerable
  questions are written against the article, so they are hard negatives about the document's own topics);
* NQ and HotpotQA training questions twice: on their document (answerable), and on the same document with every
  passage that holds a gold sentence or the answer removed (no evidence; the remaining passages are same-topic
  distractors, and for HotpotQA the other retrieved paragraphs).

For each item the question pass runs once and the last question token's hidden state is read after each candidate
layer (all below the SwiftKV layer, so the probe sees the same state with SwiftKV on or off). The probe is fitted on
the SQuAD items only (``--probe-sources``): fitted on all three sources it learnt which *corpus* a document came from
(every SQuAD item shares one article) instead of whether it answers, and its single threshold abstained on every
answerable NQ question (cross-validated). The NQ/HotpotQA items then only calibrate the threshold, as documents the
probe never saw. Grouped cross-validation on the SQuAD items (neighbouring questions about the same paragraph stay
in one fold) picks the layer; the out-of-fold probabilities (SQuAD) and the held-out ones (NQ/HotpotQA) pick the
threshold with the best mean accuracy over the three sources among those that abstain on at most 10% of any
source's answerable questions (``--max-false-abstention``); the final probe is refitted on all SQuAD items.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.files import write_atomic
from cfic.training.adapter_files import adapter_folder, update_settings

CANDIDATE_LAYERS = (6, 8, 10, 12, 14)
SQUAD_GROUP = 20  # consecutive SQuAD questions (stored paragraph by paragraph) that share a fold
FOLDS = 5


@dataclass(frozen=True)
class ProbeItem:
    source: str
    group: str
    question: str
    documents: tuple[str, ...]
    doc_key: str
    no_evidence: bool


def without_evidence(document: str, gold: Sequence[tuple[int, int, int]], answers: Sequence[str]) -> str | None:
    """``document`` with every blank-line separated passage that overlaps a gold sentence or contains an answer
    removed; None when nothing would be removed or an answer still occurs (no clean negative)."""
    from cfic.eval.metrics import contains_answer

    blocks, pos = [], 0
    for part in document.split("\n\n"):
        blocks.append((pos, pos + len(part), part))
        pos += len(part) + 2
    keep = [p for a, b, p in blocks
            if not any(a < e and b > s for _, s, e in gold) and not contains_answer(p, answers)]
    text = "\n\n".join(keep)
    if len(keep) == len(blocks) or not text.strip() or contains_answer(text, answers):
        return None
    return text


def training_items(n_nq: int, n_hotpot: int, nq_offset: int = 1200, hotpot_offset: int = 55) -> list[ProbeItem]:
    """SQuAD training questions, then NQ / HotpotQA training questions with and without their evidence.
    The offsets keep clear of the questions ``cfic fit-prior`` fits the prior on."""
    from cfic.eval import load_split

    items = [ProbeItem("squad", f"squad-{i // SQUAD_GROUP}", ex.question, ex.documents, ex.doc_key or ex.id,
                       not ex.answerable)
             for i, ex in enumerate(load_split("squad", "train"))]
    for source, offset, n in (("nq", nq_offset, n_nq), ("hotpotqa", hotpot_offset, n_hotpot)):
        for ex in load_split(source, "train")[offset: offset + n]:
            negative = without_evidence(ex.documents[0], ex.gold, ex.answers) if len(ex.documents) == 1 else None
            if negative is None:
                continue
            items.append(ProbeItem(source, ex.id, ex.question, ex.documents, ex.id, False))
            items.append(ProbeItem(source, ex.id, ex.question, (negative,), ex.id + "/no-evidence", True))
    return items


def question_states(grounder: Any, items: Sequence[ProbeItem], layers: Sequence[int],
                    progress: bool = True) -> np.ndarray:
    """(items, len(layers), hidden) float32: the last question token's hidden state leaving each layer, first
    window of the first document (the documents here fit one window)."""
    import torch
    from tqdm.auto import tqdm

    from cfic.decoding.runner import causal_extension_mask, forward

    runner = grounder.runner
    out = np.zeros((len(items), len(layers), runner.model.config.hidden_size), dtype=np.float32)
    key, encodings = None, None
    with torch.inference_mode():
        for i, item in enumerate(tqdm(items, desc="question passes", unit="q", disable=not progress)):
            if item.doc_key != key:
                key, encodings = item.doc_key, grounder.encode(list(item.documents))
            window = encodings[0].windows[0]
            ids = grounder.template.query_ids(grounder.tokenizer, item.question, grounder.config.max_query_tokens)
            cache = window.kv.fork(len(ids))
            start = cache.length
            tokens = torch.tensor([ids], dtype=torch.long, device=runner.device)
            positions = torch.arange(start, start + len(ids), device=runner.device).unsqueeze(0)
            mask = causal_extension_mask(start, len(ids), runner.device)
            hidden, done = None, 0
            for j, layer in enumerate(layers):
                hidden = forward(runner, tokens, positions, cache, mask, start=done, hidden=hidden, stop=layer)
                out[i, j] = hidden[0, -1].float().cpu().numpy()
                done = layer
    return out


def cached_question_states(grounder: Any, items: Sequence[ProbeItem], layers: Sequence[int], cache: Path | None,
                           adapter: Path, progress: bool = True) -> np.ndarray:
    """:func:`question_states`, kept in ``cache`` (an ``.npz``) keyed by the model, the items and the layers, so
    refitting the threshold rule or the penalty does not rerun half an hour of question passes."""
    import hashlib

    weights = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(adapter.glob("adapter_model*")))).hexdigest()
    key = hashlib.sha256(repr((grounder.model_name, weights, list(layers),
                               [(i.source, i.doc_key, i.question) for i in items])).encode()).hexdigest()[:16]
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return saved["states"]
    states = question_states(grounder, items, layers, progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with io.BytesIO() as buffer:  # np.savez would add ".npz" to a temp file's name
            np.savez(buffer, key=np.array(key), states=states)
            write_atomic(cache, buffer.getvalue())
    return states


def fold_of(groups: Sequence[str], folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    fold = {names[k]: int(r % folds) for r, k in enumerate(order)}
    return np.array([fold[g] for g in groups])


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Balanced, L2-regularised logistic regression on standardised states -> (mean, scale, coef, intercept)."""
    from cfic.training.fit_prior import fit_logistic

    coef, intercept, mu, sd = fit_logistic(x.astype(np.float64), y.astype(np.float64), l2=l2, steps=1500)
    return mu.astype(np.float32), sd.astype(np.float32), (coef * sd).astype(np.float32), intercept + float(
        (coef * mu).sum())


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, l2: float) -> np.ndarray:
    """Out-of-fold logits of the probe."""
    logits = np.zeros(len(y))
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        mu, sd, coef, b = fit_probe(x[train], y[train], l2)
        logits[test] = ((x[test] - mu) / sd) @ coef + b
    return logits


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def false_abstention(probabilities: np.ndarray, labels: np.ndarray, sources: np.ndarray, t: float) -> float:
    """The largest share, over sources, of answerable items that threshold ``t`` would abstain on."""
    rates = [float(np.mean(probabilities[(sources == s) & (labels == 0)] >= t))
             for s in sorted(set(sources.tolist())) if ((sources == s) & (labels == 0)).any()]
    return max(rates, default=0.0)


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, sources: np.ndarray,
                     max_false_abstention: float | None = None) -> tuple[float, dict]:
    """The P(no evidence) threshold with the best mean over sources of the decision accuracy (each source counts
    once, however many items it has), among those that abstain on at most ``max_false_abstention`` of any
    source's answerable items (a lost answer costs a user more than an unneeded span); ties go to the highest
    threshold (abstain as little as possible)."""
    names = sorted(set(sources.tolist()))

    def accuracy(t: float) -> dict[str, float]:
        return {s: float(np.mean((probabilities[sources == s] >= t) == (labels[sources == s] == 1))) for s in names}

    candidates = [t for t in sorted({1.0, *(float(p) for p in probabilities)})
                  if max_false_abstention is None
                  or false_abstention(probabilities, labels, sources, t) <= max_false_abstention]
    best = max(candidates, key=lambda t: (float(np.mean(list(accuracy(t).values()))), t))
    return best, accuracy(best)


def fit_abstention(n_nq: int = 130, n_hotpot: int = 45, adapter: str | None = None, out: str | None = None,
                   dtype: str | None = None, l2: float = 0.15, progress: bool = True,
                   cache: Path | None = None, max_false_abstention: float | None = 0.1,
                   probe_sources: Sequence[str] = ("squad",)) -> dict[str, Any]:
    """Fit the probe and the threshold (module docstring); writes the probe and the ``abstention`` part of
    ``cfic.json`` into ``out`` or the adapter folder and returns the report."""
    from cfic.answerability import PROBE_FILE, AnswerabilityProbe
    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS
    from cfic.prior import PROBE_FEATURE, Abstention

    adapter_path = adapter_folder(adapter, "abstention")
    t0 = time.time()
    grounder = Grounder.from_pretrained(None, dtype=dtype, adapter=adapter_path, swiftkv=None, abstention=None)
    items = training_items(n_nq, n_hotpot)
    layers = [layer for layer in CANDIDATE_LAYERS if layer < grounder.runner.num_layers] or [1]
    states = cached_question_states(grounder, items, layers, cache, adapter_path, progress)
    y = np.array([i.no_evidence for i in items], dtype=np.float64)
    sources = np.array([i.source for i in items])
    folds = fold_of([i.group for i in items])
    fit_on = np.isin(sources, list(probe_sources))
    if not fit_on.any() or len(set(y[fit_on].tolist())) < 2:
        raise CficError(f"no answerable and unanswerable items from {', '.join(probe_sources)} to fit the probe on")
    per_layer = {}
    for j, layer in enumerate(layers):
        logits = np.zeros(len(y))
        logits[fit_on] = out_of_fold(states[fit_on, j], y[fit_on], folds[fit_on], l2)
        if (~fit_on).any():  # the other sources only calibrate the threshold: the probe never saw them
            mu, sd, coef, b = fit_probe(states[fit_on, j], y[fit_on], l2)
            logits[~fit_on] = ((states[~fit_on, j] - mu) / sd) @ coef + b
        per_layer[layer] = {"auc": auc(logits[fit_on], y[fit_on]), "logits": logits,
                            "auc_by_source": {s: auc(logits[sources == s], y[sources == s])
                                              for s in sorted(set(sources.tolist()))}}
    best_j, best_layer = max(enumerate(layers), key=lambda jl: per_layer[jl[1]]["auc"])
    oof = per_layer[best_layer]["logits"]
    oof_p = 1 / (1 + np.exp(-oof))
    threshold, accuracy = choose_threshold(oof_p, y, sources, max_false_abstention)
    alternatives = {}
    for cap in (0.02, 0.05, 0.1, 0.2, 0.3, None):
        t, acc = choose_threshold(oof_p, y, sources, cap)
        alternatives["none" if cap is None else str(cap)] = {
            "threshold": round(t, 4), "accuracy_by_source": {k: round(v, 4) for k, v in acc.items()},
            "false_abstention": round(false_abstention(oof_p, y, sources, t), 4)}
    mu, sd, coef, b = fit_probe(states[fit_on, best_j], y[fit_on], l2)
    probe = AnswerabilityProbe(best_layer, mu, sd, coef, b)
    abstention = Abstention((1.0,), 0.0, threshold, (PROBE_FEATURE,), probe)
    report = {
        "features": [PROBE_FEATURE], "layer": best_layer, "threshold": threshold,
        "cross_validated": {"folds": FOLDS,
                            "auc_by_layer": {str(k): round(v["auc"], 4) for k, v in per_layer.items()},
                            "auc_by_source": {s: round(a, 4)
                                              for s, a in per_layer[best_layer]["auc_by_source"].items()},
                            "accuracy_by_source": {s: round(a, 4) for s, a in accuracy.items()},
                            "false_abstention": round(false_abstention(oof_p, y, sources, threshold), 4),
                            "by_false_abstention_cap": alternatives,
                            "answer_everything": {s: round(float(np.mean(y[sources == s] == 0)), 4)
                                                  for s in sorted(set(sources.tolist()))}},
        "items": {s: int((sources == s).sum()) for s in sorted(set(sources.tolist()))},
        "probe_sources": list(probe_sources), "no_evidence_items": int(y.sum()), "l2": l2,
        "max_false_abstention": max_false_abstention,
        "source": "training side only: squad train article, nq/hotpotqa train questions with and without evidence",
        "seconds": round(time.time() - t0, 1),
    }
    target_dir = Path(out) if out else adapter_path
    target_dir.mkdir(parents=True, exist_ok=True)
    probe.save(target_dir / PROBE_FILE)

    def keep_enabled(settings: dict[str, Any]) -> None:
        # whether the shipped model abstains by default is a decision made on its measured cost; a refit keeps it
        enabled = bool(settings.get("abstention", {}).get("enabled", True))
        settings["abstention"] = {**replace(abstention, enabled=enabled).to_dict(), "fit": report}

    update_settings(target_dir / ADAPTER_SETTINGS, keep_enabled)
    return report

"""``cfic fit-abstention``: fit the abstention model (P(no evidence) and its threshold) on the training side.

Training items (the evaluation splits are never read):

* every SQuAD 2.0 training-side question on its whole article — two articles (``SQUAD_TRAIN_ARTICLES``), answerable
  and unanswerable: SQuAD's unanswerable questions are written against the article, so they are hard negatives
  about the document's own topics;
* NQ and HotpotQA training questions twice: on their document (answerable), and on the same document with every
  passage that holds a gold sentence or the answer removed (no evidence; the remaining passages are same-topic
  distractors, and for HotpotQA the other retrieved paragraphs).

For each item the question pass runs once as the grounder runs it (:mod:`cfic.training.abstention_data`, kept on
disk and resumable): the last question token's hidden state after each candidate probe layer (all below the SwiftKV
layer), the end-of-evidence probability at the first answer position, the attention ranker's peak, the prior's best
cosines. Everything is scored *held out by article*: one fold per SQuAD training article (the NQ/HotpotQA items
spread over as many folds). Why: fitted and cross-validated within the one article the project had, the hidden-state
probe reached AUC 0.84 and shipped; on the evaluation article it scored 0.58, and held out by article it scores
about 0.5-0.55 — it had learnt the article's questions, not answerability. The feature sets of ``FEATURE_SETS`` are
compared as logistic models on out-of-fold features (the probe's logits are out-of-fold too); the one with the best
mean accuracy over sources wins, at the threshold that abstains on at most ``--max-false-abstention`` of any source's
answerable items. The model acts by default (``enabled``) only when it meets the issue's bar held out (SQuAD
no-evidence accuracy >= 0.75 abstaining on at most 2% of answerable questions); otherwise it ships reporting
P(no evidence) only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.training.adapter_files import adapter_folder, update_settings

CANDIDATE_LAYERS = (6, 8, 10, 12, 14)
FOLDS = 5
# The feature sets compared held out (each a logistic model on :func:`cfic.prior.abstention_features`' names).
FEATURE_SETS = (
    ("answerability_logit",),
    ("log_p_end_first", "max_sentence_cosine", "max_paragraph_cosine"),
    ("log_p_end_first", "max_sentence_cosine", "max_paragraph_cosine", "answerability_logit"),
)
STACK_L2 = 0.1


@dataclass(frozen=True)
class ProbeItem:
    source: str
    group: str
    question: str
    documents: tuple[str, ...]
    doc_key: str
    no_evidence: bool
    gold: tuple[tuple[int, int], ...] = ()  # character spans of the evidence in the first document


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

    items = [ProbeItem("squad", ex.doc_key, ex.question, ex.documents, ex.doc_key, not ex.answerable,
                       tuple((a, b) for d, a, b in ex.gold if d == 0))
             for ex in load_split("squad", "train")]
    for source, offset, n in (("nq", nq_offset, n_nq), ("hotpotqa", hotpot_offset, n_hotpot)):
        for ex in load_split(source, "train")[offset: offset + n]:
            negative = without_evidence(ex.documents[0], ex.gold, ex.answers) if len(ex.documents) == 1 else None
            if negative is None:
                continue
            items.append(ProbeItem(source, ex.id, ex.question, ex.documents, ex.id, False,
                                   tuple((a, b) for d, a, b in ex.gold if d == 0)))
            items.append(ProbeItem(source, ex.id, ex.question, (negative,), ex.id + "/no-evidence", True))
    return items


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


def article_folds(items: Sequence[ProbeItem]) -> np.ndarray:
    """One fold per SQuAD training article (a probe is scored on an article it never saw: SQuAD 2.0's unanswerable
    questions are written against their article, and within one article a probe learns the article's questions);
    the NQ / HotpotQA items spread over as many folds by question."""
    articles = sorted({i.group for i in items if i.source == "squad"})
    folds = np.zeros(len(items), dtype=int)
    others = [k for k, i in enumerate(items) if i.source != "squad"]
    if others:
        folds[others] = fold_of([items[k].group for k in others], folds=max(len(articles), 2))
    for k, item in enumerate(items):
        if item.source == "squad":
            folds[k] = articles.index(item.group)
    return folds


def item_features(material: Sequence[Any], probe_logits: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each item's abstention features as the grounder computes them (:func:`cfic.prior.abstention_features`:
    the smallest end probability over windows, the best cosines, the probe's smallest logit)."""
    from cfic.prior import PROBE_FEATURE

    out = {"log_p_end_first": np.array([m.window_features[:, 0].min() for m in material]),
           "max_sentence_cosine": np.array([m.item_features[0] for m in material]),
           "max_paragraph_cosine": np.array([m.item_features[1] for m in material])}
    if probe_logits is not None:
        out[PROBE_FEATURE] = probe_logits
    return out


def fit_abstention(n_nq: int = 130, n_hotpot: int = 45, adapter: str | None = None, out: str | None = None,
                   dtype: str | None = None, l2: float = 0.15, progress: bool = True,
                   material: Path | None = None, max_false_abstention: float | None = 0.1,
                   probe_sources: Sequence[str] = ("squad",)) -> dict[str, Any]:
    """Fit the abstention model (module docstring); writes it (and the probe when it is chosen) into ``out`` or the
    adapter folder's ``cfic.json`` and returns the report. ``material``: where the question passes are kept
    (:mod:`cfic.training.abstention_data`; resumable, default ``runs/abstention``)."""
    from cfic.answerability import PROBE_FILE, AnswerabilityProbe
    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS
    from cfic.prior import PROBE_FEATURE, Abstention
    from cfic.training import abstention_data
    from cfic.training.fit_prior import fit_logistic

    adapter_path = adapter_folder(adapter, "abstention")
    t0 = time.time()
    grounder = Grounder.from_pretrained(None, dtype=dtype, adapter=adapter_path, abstention=None)
    items = training_items(n_nq, n_hotpot)
    layers = [layer for layer in CANDIDATE_LAYERS if layer < grounder.runner.num_layers] or [1]
    folder = Path(material) if material is not None else Path("runs/abstention")
    abstention_data.collect(folder, items, grounder, layers, progress)
    found = abstention_data.load(folder, items)
    states = np.stack([m.states[0] for m in found])  # [items, layers, hidden]: the training documents fit a window
    y = np.array([i.no_evidence for i in items], dtype=np.float64)
    sources = np.array([i.source for i in items])
    groups = np.array([i.group for i in items])
    folds = article_folds(items)
    fit_on = np.isin(sources, list(probe_sources))
    if not fit_on.any() or len(set(y[fit_on].tolist())) < 2:
        raise CficError(f"no answerable and unanswerable items from {', '.join(probe_sources)} to fit the probe on")
    articles = sorted({g for g, s in zip(groups, sources, strict=True) if s == "squad"})

    def held_out_auc(scores: np.ndarray) -> dict[str, float]:
        return {name: round(auc(scores[groups == name] if name.startswith("squad:") else scores[sources == name],
                                y[groups == name] if name.startswith("squad:") else y[sources == name]), 4)
                for name in [*articles, *sorted(set(sources.tolist()) - {"squad"})]}

    per_layer = {}
    for j, layer in enumerate(layers):
        logits = np.zeros(len(y))
        logits[fit_on] = out_of_fold(states[fit_on, j], y[fit_on], folds[fit_on], l2)
        if (~fit_on).any():  # the other sources: the probe never saw them
            mu, sd, coef, b = fit_probe(states[fit_on, j], y[fit_on], l2)
            logits[~fit_on] = ((states[~fit_on, j] - mu) / sd) @ coef + b
        per_layer[layer] = {"logits": logits, "auc": held_out_auc(logits)}
    best_j, best_layer = max(enumerate(layers), key=lambda jl: np.mean(
        [per_layer[jl[1]]["auc"][a] for a in articles]))
    features = item_features(found, per_layer[best_layer]["logits"])
    # the attention ranker's reading, measured as a feature (its peak over windows; the fused search score's too)
    looked_at = {**features, "attention_peak": np.array([m.window_features[:, 1].max() for m in found]),
                 "fused_peak": np.array([m.window_features[:, 2].max() for m in found])}
    candidates: dict[str, dict] = {}
    for names in FEATURE_SETS:
        x = np.stack([features[n] for n in names], axis=1)
        p = 1 / (1 + np.exp(-out_of_fold(x, y, folds, STACK_L2)))  # the probe's fit, on the features
        t, acc = choose_threshold(p, y, sources, max_false_abstention)
        candidates["+".join(names)] = {
            "features": list(names), "auc": held_out_auc(p), "threshold": round(t, 4),
            "accuracy_by_source": {k: round(v, 4) for k, v in acc.items()},
            "false_abstention": round(false_abstention(p, y, sources, t), 4), "p": p}
    chosen = max(candidates.values(), key=lambda c: np.mean(list(c["accuracy_by_source"].values())))
    names = tuple(chosen["features"])
    x = np.stack([features[n] for n in names], axis=1)
    coef, intercept, _, _ = fit_logistic(x, y, l2=STACK_L2, steps=1500)
    probe = None
    if PROBE_FEATURE in names:
        mu, sd, pc, pb = fit_probe(states[fit_on, best_j], y[fit_on], l2)
        probe = AnswerabilityProbe(best_layer, mu, sd, pc, pb)
    threshold = float(chosen["threshold"])
    abstention = Abstention(tuple(float(c) for c in coef), float(intercept), threshold, names, probe)
    squad_acc = chosen["accuracy_by_source"].get("squad", 0.0)
    report = {
        "features": list(names), "threshold": threshold, "probe_layer": best_layer if probe is not None else None,
        "held_out": {"folds": "one per SQuAD training article (" + ", ".join(articles) + "); NQ/HotpotQA by question",
                     "probe_auc_by_layer": {str(k): v["auc"] for k, v in per_layer.items()},
                     "single_feature_auc": {n: held_out_auc(v) for n, v in looked_at.items()},
                     "feature_sets": {k: {kk: vv for kk, vv in v.items() if kk != "p"} for k, v in candidates.items()},
                     "answer_everything": {s: round(float(np.mean(y[sources == s] == 0)), 4)
                                           for s in sorted(set(sources.tolist()))}},
        # the bar for acting by default: no-evidence accuracy >= 0.75 at a small cost in answers
        "earns_default": bool(squad_acc >= 0.75 and chosen["false_abstention"] <= 0.02),
        "items": {s: int((sources == s).sum()) for s in sorted(set(sources.tolist()))},
        "no_evidence_items": int(y.sum()), "l2": l2, "stack_l2": STACK_L2,
        "max_false_abstention": max_false_abstention,
        "source": "training side only: squad training articles, nq/hotpotqa train questions with and without "
                  "evidence",
        "seconds": round(time.time() - t0, 1),
    }
    target_dir = Path(out) if out else adapter_path
    target_dir.mkdir(parents=True, exist_ok=True)
    if probe is not None:
        probe.save(target_dir / PROBE_FILE)

    def write(settings: dict[str, Any]) -> None:
        # acting by default is decided on the training side: only a model that meets the bar above abstains unasked
        settings["abstention"] = {**replace(abstention, enabled=report["earns_default"]).to_dict(), "fit": report}

    update_settings(target_dir / ADAPTER_SETTINGS, write)
    return report

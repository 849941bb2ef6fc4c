"""``cfic fit-prior``: fit the sentence prior's weights and the LM weight on the training splits only, and write
them into the adapter's ``cfic.json``.

Two stages, each on training-side examples (the evaluation splits are never read):

1. *Signal weights* (no LM): the weights of cosine(question, sentence), cosine(question, paragraph), BM25 and the
   answer-type match that put an answer-bearing sentence among the prior's top ``top_k`` most often (NQ and
   HotpotQA train).
2. *Prior scale and LM weight*: the real constrained prefix search with the prior, over a grid, with the model as
   it is shipped (adapter merged, SwiftKV as configured); the objective is the same top-``top_k`` hit rate of the
   start sentences it picks, averaged over NQ, HotpotQA and the answerable held-out SQuAD training questions (a
   whole article) so each document shape counts (the pure-LM search is one row of the grid).

The abstention model is not fitted here: ``cfic fit-abstention`` owns it, and its settings are left as they are.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from cfic.prior import SIGNALS, PriorWeights, SentencePrior
from cfic.training.adapter_files import update_settings

SENTENCE_GRID = (0.0, 1.0)
PARAGRAPH_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
BM25_GRID = (0.0, 0.05, 0.1, 0.2, 0.4)
ANSWER_TYPE_GRID = (0.0, 0.05, 0.1, 0.2, 0.3)
SCALE_GRID = (5.0, 10.0, 20.0)
LM_GRID = (0.0, 0.25, 0.5, 1.0)


def _answer_mask(sentences, answers) -> np.ndarray:
    from cfic.eval.metrics import contains_answer

    return np.array([contains_answer(s.text, answers) for s in sentences], dtype=bool)


def top_hit(scores: np.ndarray, mask: np.ndarray, k: int) -> bool:
    """An answer-bearing sentence among the ``k`` best scores (ties to the earlier sentence)."""
    return bool(mask[np.argsort(-scores, kind="stable")[:k]].any())


def fit_signal_weights(items: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, float]:
    """Stage 1: the direction of the signal weights with the best top-k hit rate (``sentence`` fixed to 1 or 0)."""
    best, best_rate = None, -1.0
    for w in itertools.product(SENTENCE_GRID, PARAGRAPH_GRID, BM25_GRID, ANSWER_TYPE_GRID):
        if not any(w[:3]):
            continue
        vec = np.array(w, dtype=np.float32)
        rate = float(np.mean([top_hit(sig @ vec, mask, k) for sig, mask in items]))
        if rate > best_rate + 1e-9:
            best, best_rate = vec, rate
    assert best is not None
    return best, best_rate


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 3000) -> tuple[np.ndarray, float,
                                                                                                np.ndarray, np.ndarray]:
    """L2-regularised logistic regression on standardised features (plain gradient descent: 4 features, a few
    hundred rows). Returns coefficients and intercept on the *raw* feature scale, plus the standardisation."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    pos = y.mean()
    weights = np.where(y == 1, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))  # balanced classes
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = (p - y) * weights
        w -= 0.1 * (z.T @ g / len(y) + l2 * w)
        b -= 0.1 * g.mean()
    coef = w / sd
    return coef, float(b - (coef * mu).sum()), mu, sd


def _paired_gain(hits: dict[str, dict[tuple[Any, float], list[bool]]], a: tuple[Any, float], b: tuple[Any, float]
                 ) -> dict[str, float]:
    """Objective of setting ``a`` minus setting ``b`` (mean over sources of the top-k hit rate) with a paired
    bootstrap 95% interval that resamples questions within each source: is the LM's share worth anything?"""
    from cfic.eval.compare import paired_bootstrap

    sources = [src for src, h in hits.items() for _ in h[a]]
    diff, low, high = paired_bootstrap([x for h in hits.values() for x in h[a]],
                                       [x for h in hits.values() for x in h[b]], strata=sources)
    return {"difference": diff, "low": low, "high": high}


def question_search(grounder: Any, encodings: list[Any], question: str,
                    priors: list[PriorWeights | None]) -> dict[str, Any]:
    """The question pass once per window, then one constrained prefix search per prior setting (the pure-LM one
    for ``None``) on a private copy of the cache: start sentences and the best ranking score for each setting,
    the smallest first-position end probability and the prior's signals. The same computations as
    ``Grounder.ground`` up to the prefix search (span ends do not enter these features)."""
    import torch

    from cfic.decoding.encode import encode_question
    from cfic.decoding.prefix import SearchPrior, constrained_prefix_search, end_probability, rank

    k = grounder.config.top_k
    room = k * (grounder.config.max_prefix_tokens + 1)
    query_ids = grounder.template.query_ids(grounder.tokenizer, question, grounder.config.max_query_tokens)
    vector = grounder.sentence_prior.query_vector(question)
    signals = SentencePrior.document_signals(question, vector, [e.features for e in encodings])
    searches: list[tuple[list[tuple[float, int]], float]] = [([], -1e9) for _ in priors]
    p_end = 1.0
    log_priors = [None if w is None else SentencePrior.log_priors(signals, w) for w in priors]
    with torch.inference_mode():
        for d, enc in enumerate(encodings):
            sps = [None if w is None else SearchPrior(torch.from_numpy(lp[d]), w.lm)
                   for w, lp in zip(priors, log_priors, strict=True)]
            for window in enc.windows:
                cache, first = encode_question(grounder.runner, window, query_ids, room)
                p_end = min(p_end, end_probability(first, grounder.template.eos_ids))
                for i, sp in enumerate(sps):
                    found = constrained_prefix_search(grounder.runner, cache.fork(room), first, window.trie, k,
                                                      grounder.config.max_prefix_tokens, None, sp)
                    starts, best = searches[i]
                    starts = starts + [(rank(p, sp), s) for p in found for s in (p.sentences or ())]
                    searches[i] = (sorted(starts, reverse=True)[:k], max([best, *(rank(p, sp) for p in found)]))
    return {"signals": signals, "p_end": p_end, "searches": searches}


def fit_prior(n_nq: int = 60, n_hotpot: int = 30, n_stage1: int = 400, adapter: str | None = None,
              out: str | None = None, dtype: str | None = None, progress: bool = True, n_squad: int = 200,
              threads: int | None = None, n_squad_stage2: int = 30) -> dict[str, Any]:
    """Both stages (module docstring); writes the fitted prior into ``out`` or the adapter's ``cfic.json`` and
    returns the report."""
    from tqdm.auto import tqdm

    from cfic.eval import load_split
    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS
    from cfic.training.adapter_files import adapter_folder
    from cfic.training.calibration import calibration_examples
    from cfic.training.lora import TrainSettings

    adapter_path = adapter_folder(adapter, "the prior")
    t_start = time.time()
    grounder = Grounder.from_pretrained(None, dtype=dtype, adapter=adapter_path, threshold=None,
                                        prior=PriorWeights(), abstention=None)
    prior = grounder.sentence_prior
    if progress:
        tqdm.write(f"fitting for {grounder.model_name} ({grounder.runner.dtype}, SwiftKV "
                   f"{'on' if grounder.runner.swiftkv is not None else 'off'})")
    k = grounder.config.top_k
    if threads:
        import torch

        torch.set_num_threads(threads)

    # ---- stage 1: signal weights, embeddings only
    stage1 = load_split("nq", "train")[:n_stage1] + load_split("hotpotqa", "train")[: n_stage1 // 4]
    items = []
    for ex in tqdm(stage1, desc="stage 1: prior signals", unit="q", disable=not progress):
        text = ex.documents[0]
        sentences = grounder.split(text)
        mask = _answer_mask(sentences, ex.answers)
        if not mask.any():
            continue
        feats = prior.features(text, sentences)
        items.append((SentencePrior.signals(ex.question, prior.query_vector(ex.question), feats), mask))
    direction, rate1 = fit_signal_weights(items, k)
    baseline1 = float(np.mean([top_hit(sig[:, 0], mask, k) for sig, mask in items]))

    # ---- stage 2: scale and LM weight with the real prefix search, on every document shape the toolkit grounds in:
    # 20-passage NQ documents, 10-paragraph HotpotQA documents and a whole SQuAD article (one long document, many
    # questions). The objective is the mean over the three of each one's top-k hit rate, so that the one long
    # article counts as much as the many short documents (the first fits, on NQ/HotpotQA only, chose an LM weight
    # that the long article does not support).
    calib = calibration_examples(TrainSettings())[:n_squad]
    stage2 = [("nq", ex) for ex in load_split("nq", "train")[n_stage1: n_stage1 + n_nq]]
    stage2 += [("hotpotqa", ex) for ex in load_split("hotpotqa", "train")[n_stage1 // 4: n_stage1 // 4 + n_hotpot]]
    stage2 += [("squad", ex) for ex in calib if ex.answerable][:n_squad_stage2]
    configs: list[tuple[Any, float]] = [(s, lm) for s in SCALE_GRID for lm in LM_GRID]
    configs.append(("lm-only", 1.0))

    def weights_of(cfg: tuple[Any, float]) -> PriorWeights | None:
        if cfg[0] == "lm-only":
            return None
        sentence, paragraph, bm25, answer_type = (direction * cfg[0]).tolist()
        return PriorWeights(sentence, paragraph, bm25, lm=cfg[1], answer_type=answer_type)

    hits: dict[str, dict[tuple[Any, float], list[bool]]] = {}
    encodings: dict[str, Any] = {}
    squad_keys = {ex.doc_key or ex.id for src, ex in stage2 if src == "squad"}
    for source, ex in tqdm(stage2, desc="stage 2: prior x LM search", unit="q", disable=not progress):
        key = ex.doc_key or ex.id
        if key not in encodings:
            if source != "squad":  # one document per question: keep no old encodings (the SQuAD article stays)
                encodings = {k: v for k, v in encodings.items() if k in squad_keys}
            encodings[key] = grounder.encode(list(ex.documents))
        encs = encodings[key]
        mask = _answer_mask(encs[0].sentences, ex.answers)
        if not mask.any():
            continue
        found = question_search(grounder, encs, ex.question, [weights_of(c) for c in configs])
        for cfg, (starts, _) in zip(configs, found["searches"], strict=True):
            hits.setdefault(source, {}).setdefault(cfg, []).append(bool(any(mask[s] for _, s in starts)))
    by_source = {src: {c: float(np.mean(v)) for c, v in h.items()} for src, h in hits.items()}
    rates = {c: float(np.mean([r[c] for r in by_source.values()])) for c in configs}
    best_cfg = max(configs[:-1], key=lambda c: (rates[c], -c[1]))
    weights = weights_of(best_cfg)
    assert weights is not None

    # the best setting on the other side of "does the LM weigh in": with LM weight > 0 if the chosen one has 0
    rival = max((c for c in configs[:-1] if (c[1] == 0.0) != (best_cfg[1] == 0.0)), key=lambda c: (rates[c], -c[1]))
    paired = {"rival": f"{rival[0]}/{rival[1]}", **_paired_gain(hits, best_cfg, rival)}

    report = {
        "prior": {"weights": weights.to_dict(), "signals": list(SIGNALS),
                  "stage1": {"examples": len(items), "top_k_hit": rate1, "sentence_cosine_only": baseline1,
                             "direction": direction.tolist()},
                  "stage2": {"examples": {src: len(next(iter(h.values()))) for src, h in hits.items()},
                             "top_k_hit": {f"{c[0]}/{c[1]}": r for c, r in rates.items()},
                             "top_k_hit_by_source": {src: {f"{c[0]}/{c[1]}": r for c, r in rs.items()}
                                                     for src, rs in by_source.items()},
                             "chosen": {"scale": best_cfg[0], "lm": best_cfg[1]},
                             "chosen_minus_rival": paired}},
        "source": "training splits only: nq train, hotpotqa train, squad train questions held out of LoRA training",
        "swiftkv": grounder.runner.swiftkv is not None,
        "seconds": round(time.time() - t_start, 1),
    }
    target = Path(out) if out else adapter_path / ADAPTER_SETTINGS
    update_settings(target, lambda settings: settings.update(
        {"prior": report["prior"], "threshold": None, "fit_source": report["source"]}))
    return report

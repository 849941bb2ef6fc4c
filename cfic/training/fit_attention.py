"""``cfic fit-attention``: fit the attention ranker (:mod:`cfic.attention`) and its fusion weight on training splits
only, and ship them with the adapter.

1. Material (:mod:`cfic.training.attention_data`): the shipped model's question-pass attention over every sentence of
   NQ train, HotpotQA train and SQuAD training-article questions, with the prior's log prior and the evidence labels.
2. Per-head weights: a listwise model — softmax over a document's sentences of a linear function of the log
   attention masses — maximising the probability of the evidence sentences, L2-regularised (LBFGS).
   Fitted two ways: *alone* (the attention ranking by itself) and *residual* (the prior's log prior added before
   the softmax, so the weights learn what the attention knows beyond the prior). The residual wins on NQ but learns
   an article's questions rather than what marks evidence: folded by document it loses 4.6 points on the SQuAD
   articles it did not see, where the ranker fitted alone gains 4.3 (round 8, the adapter's ``attention.fit``).
3. The fusion weight and its power of the document's sentence count (``fusion(n) = fusion * (n / 64) ** power``,
   round 9), the L2 strength, residual or alone, and with or without the content-free calibration: chosen by 5-fold
   cross-validation on the same material, folded by document (every question on one SQuAD article in one fold:
   folds that split an article let the weights learn that article's questions, and chose a fusion that lost 6
   points on an article it had not seen, issue 29 round 7b), by the top-k hit rate of ``log prior + fusion(n) *
   attention log-probability`` (an answer-bearing sentence among the k best), averaged over the three sources so each
   document shape counts; the chosen setting is compared with the prior alone (fusion 0) by a paired bootstrap over
   the cross-validated questions. The final weights are refit on all material.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfic.attention import ALONE_FILE, RANKER_FILE, AttentionRanker, fusion_weight
from cfic.training.attention_data import AttentionItem

FUSION_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# fusion(n) = fusion * (n / 64) ** power (cfic.attention.fusion_weight); 0 is one weight for every document
POWER_GRID = (0.0, -0.5, -1.0, -1.5, -2.0)
RESIDUAL_FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
L2_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
SCORE_END_MARGINS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
CALIBRATION_GAIN = 0.01  # top-k hit the content-free calibration must add to pay for its second question pass
FOLDS = 5
EPS = 1e-4


def features(item: AttentionItem, calibrated: bool, eps: float = EPS) -> np.ndarray:
    """``[sentences, F]``: log masses (row, layer, head order), then the content-free ones when ``calibrated``, then
    log(tokens) — the layout :class:`~cfic.attention.AttentionRanker` applies its weights in."""
    parts = [np.log(item.attention + eps).reshape(-1, item.attention.shape[-1])]
    if calibrated:
        parts.append(np.log(item.null_attention + eps).reshape(-1, item.attention.shape[-1]))
    parts.append(np.log(np.maximum(item.tokens, 1.0))[None])
    return np.concatenate(parts, 0).T.astype(np.float32)


def _feature_mask(shape: tuple[int, int, int], calibrated: bool, swiftkv_layer: int | None) -> np.ndarray:
    """Which features get a weight: not the mean row from the SwiftKV layer on (there it is the last row)."""
    one = np.ones(shape, dtype=bool)
    if swiftkv_layer is not None:
        one[1, swiftkv_layer:] = False
    parts = [one.ravel()] * (2 if calibrated else 1)
    return np.concatenate([*parts, [True]])


def fit_weights(x: Sequence[np.ndarray], y: Sequence[np.ndarray], l2: float, mask: np.ndarray,
                steps: int = 200, offsets: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Listwise: maximise mean log(sum of softmax probability on the evidence sentences) - l2 |w|^2, on features
    scaled to unit spread (the returned weights are on the raw scale). ``offsets``: per-sentence logits added before
    the softmax (the prior's log prior): the weights then learn what the attention knows beyond the prior."""
    import torch

    sd = np.concatenate(list(x)).std(0) + 1e-6
    xs = [torch.from_numpy(a[:, mask] / sd[mask]) for a in x]
    ys = [torch.from_numpy(b) for b in y]
    base = [torch.from_numpy(o.astype(np.float32)) for o in offsets] if offsets is not None else [0.0] * len(xs)
    w = torch.zeros(int(mask.sum()), requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = sum(-torch.logsumexp(torch.log_softmax(a @ w + o, 0)[b], 0)
                   for a, b, o in zip(xs, ys, base, strict=True))
        loss = loss / len(xs) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    out = np.zeros(mask.shape[0], dtype=np.float32)
    out[mask] = w.detach().numpy() / sd[mask]
    return out


def ranker_from_weights(flat: np.ndarray, shape: tuple[int, int, int], calibrated: bool, fusion: float,
                        swiftkv_layer: int | None, eps: float = EPS, fusion_power: float = 0.0) -> AttentionRanker:
    n = int(np.prod(shape))
    null = flat[n: 2 * n].reshape(shape) if calibrated else None
    return AttentionRanker(flat[:n].reshape(shape).copy(), float(flat[-1]), fusion, eps, None if null is None
                           else null.copy(), swiftkv_layer, fusion_power)


def setting_key(l2: float, fusion: float, power: float) -> str:
    """``fused/<l2>/<fusion>`` for one weight everywhere (power 0), ``fused/<l2>/<fusion>/n^<power>`` otherwise."""
    return f"fused/{l2}/{fusion}" + (f"/n^{power}" if power else "")


def parse_setting(key: str) -> tuple[bool, bool, float, float, float]:
    """(calibrated, residual, l2, fusion, power) of a table key ``<plain|calibrated>/<alone|residual>/fused/...``
    (or ``.../attention/<l2>``: fusion 1, power 0)."""
    parts = key.split("/")
    cal, residual, l2 = parts[0] == "calibrated", parts[1] == "residual", float(parts[3])
    fusion = float(parts[4]) if len(parts) > 4 else 1.0
    power = float(parts[5].removeprefix("n^")) if len(parts) > 5 else 0.0
    return cal, residual, l2, fusion, power


def _log_softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max()
    return s - np.log(np.exp(s).sum())


def top_hit(scores: np.ndarray, mask: np.ndarray, k: int) -> bool:
    return bool(mask[np.argsort(-scores, kind="stable")[:k]].any())


def document_folds(items: Sequence[AttentionItem], folds: int, seed: int = 0) -> np.ndarray:
    """A fold per item such that the items of one document (``group``) share it: groups in a seeded random order,
    largest first, each into the fold with the fewest items so far."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group or str(i), []).append(i)
    names = list(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    ranked = sorted((names[j] for j in order), key=lambda g: -len(groups[g]))  # stable: ties keep the random order
    out, sizes = np.zeros(len(items), dtype=np.int64), np.zeros(folds, dtype=np.int64)
    for g in ranked:
        f = int(np.argmin(sizes))
        out[groups[g]] = f
        sizes[f] += len(groups[g])
    return out


def cross_validate(items: Sequence[AttentionItem], calibrated: bool, swiftkv_layer: int | None, k: int,
                   l2_grid: Sequence[float] = L2_GRID, fusion_grid: Sequence[float] = FUSION_GRID,
                   folds: int = FOLDS, seed: int = 0, residual: bool = False,
                   power_grid: Sequence[float] = (0.0,)) -> dict[str, Any]:
    """Out-of-fold top-``k`` hits per (l2, fusion, power) and of the attention alone, per question. ``residual``: fit
    the weights on top of the prior (``fit_weights`` offsets). ``power_grid``: the fusion weight's exponent of the
    document's sentence count (:meth:`~cfic.attention.AttentionRanker.fusion_at`)."""
    x = [features(it, calibrated) for it in items]
    y = [it.evidence for it in items]
    target = [it.answer if it.answer.any() else it.evidence for it in items]
    shape = items[0].attention.shape[:3]
    mask = _feature_mask(shape, calibrated, swiftkv_layer)
    fold = document_folds(items, folds, seed)
    hits: dict[str, list[bool]] = {}
    for l2 in l2_grid:
        alone = [False] * len(items)
        fused = {(f, p): [False] * len(items) for f in fusion_grid for p in power_grid}
        for f in range(folds):
            train = [i for i in range(len(items)) if fold[i] != f]
            w = fit_weights([x[i] for i in train], [y[i] for i in train], l2, mask,
                            offsets=[items[i].log_prior for i in train] if residual else None)
            for i in np.flatnonzero(fold == f):
                a = _log_softmax(x[i] @ w)
                alone[i] = top_hit(a, target[i], k)
                for fu, p in fused:
                    fused[fu, p][i] = top_hit(items[i].log_prior + fusion_weight(fu, p, len(a)) * a, target[i], k)
        hits[f"attention/{l2}"] = alone
        for (fu, p), h in fused.items():
            if fu or not p:  # fusion 0 is the prior alone whatever the power
                hits[setting_key(l2, fu, p)] = h
    return hits


def _by_source(items: Sequence[AttentionItem], hits: Sequence[bool]) -> dict[str, float]:
    sources = sorted({it.source for it in items})
    return {s: float(np.mean([h for it, h in zip(items, hits, strict=True) if it.source == s])) for s in sources}


def fit_attention(material: str | Path = "runs/attention", n_nq: int = 200, n_hotpot: int = 100,
                  n_squad: int = 200, adapter: str | None = None, out: str | None = None,
                  calibrated: bool | None = None, progress: bool = True, n_squad_second: int = 400
                  ) -> dict[str, Any]:
    """Collect (resumable), cross-validate, refit and write the rankers and the ``attention`` entry of the adapter's
    ``cfic.json`` (or ``out``'s folder): ``attention_ranker.safetensors``, the one fused into the search (the best
    cross-validated fused setting: weights fitted on top of the prior, or alone), and
    ``attention_ranker_alone.safetensors``, the attention ranking fitted without the prior (``cfic evaluate``'s
    ``attention`` row). The new entry replaces the old one whole, so a ``query_update`` (``cfic fit-query-heads``,
    trained through the old ranker's weights) is dropped with it: fit it again. ``calibrated``: None chooses with or
    without the content-free question by the same cross-validation."""
    from tqdm.auto import tqdm

    from cfic.eval.compare import paired_bootstrap
    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS
    from cfic.training import attention_data
    from cfic.training.adapter_files import adapter_folder, update_settings

    t0 = time.time()
    folder = adapter_folder(adapter, "the attention ranker")
    grounder = Grounder.from_pretrained(None, adapter=folder, abstention=None, attention=None)
    if grounder.config.prior is None:
        from cfic.errors import CficError

        raise CficError("the attention ranker fuses with the sentence prior: fit the prior first (cfic fit-prior)")
    examples = attention_data.training_examples(n_nq, n_hotpot, n_squad, n_squad_second=n_squad_second)
    attention_data.collect(material, examples, grounder, progress=progress)
    items = list(attention_data.load(material))
    k = grounder.config.top_k
    sw = grounder.runner.swiftkv.layer if grounder.runner.swiftkv is not None else None
    shape = items[0].attention.shape[:3]
    sources = [it.source for it in items]
    table: dict[str, dict[str, Any]] = {}
    per_question: dict[str, list[bool]] = {}
    variants = [(cal, residual) for cal in ([False, True] if calibrated is None else [calibrated])
                for residual in (False, True)]
    for cal, residual in tqdm(variants, desc="cross-validating rankers", unit="variant", disable=not progress):
        hits = cross_validate(items, cal, sw, k, residual=residual, power_grid=POWER_GRID,
                              fusion_grid=RESIDUAL_FUSION_GRID if residual else FUSION_GRID)
        for name, h in hits.items():
            if residual and name.startswith("attention/"):
                continue  # a residual alone ranks nothing
            key = f"{'calibrated' if cal else 'plain'}/{'residual' if residual else 'alone'}/{name}"
            by = _by_source(items, h)
            table[key] = {"top_k_hit": float(np.mean(list(by.values()))), "by_source": by}
            per_question[key] = h

    def best(prefix: str) -> str:
        """The best cross-validated setting; the content-free calibration costs a second question pass per window,
        so it is chosen only when it beats the best plain setting by ``CALIBRATION_GAIN``."""
        def top(cal: str) -> str | None:
            keys = [key for key in table if f"/{prefix}/" in key and key.startswith(cal)]
            return max(keys, key=lambda key: table[key]["top_k_hit"]) if keys else None

        plain, cal = top("plain/"), top("calibrated/")
        if plain is None or (cal is not None and table[cal]["top_k_hit"] >= table[plain]["top_k_hit"]
                             + CALIBRATION_GAIN):
            assert cal is not None
            return cal
        return plain

    fused_key, alone_key = best("fused"), best("attention")
    prior_setting = (*parse_setting(fused_key)[:3], 0.0)  # the chosen variant and l2 at fusion 0: the prior alone
    prior_key = next(key for key in table if "/fused/" in key and parse_setting(key)[:4] == prior_setting)
    diff, low, high = paired_bootstrap([float(h) for h in per_question[fused_key]],
                                       [float(h) for h in per_question[prior_key]], strata=sources)

    def refit(key: str) -> AttentionRanker:
        cal, residual, l2, fusion, power = parse_setting(key)
        flat = fit_weights([features(it, cal) for it in items], [it.evidence for it in items], l2,
                           _feature_mask(shape, cal, sw), offsets=[it.log_prior for it in items] if residual else None)
        return ranker_from_weights(flat, shape, cal, fusion, sw, fusion_power=power)

    fused = refit(fused_key)
    alone = refit(alone_key)
    margins = score_end_study(items, fused, k, grounder.config.max_span_tokens)
    margin = max(margins, key=lambda m: (margins[m]["f1"], -float(m)))
    report = {
        "chosen": {"fused": fused_key, "alone": alone_key},
        "cross_validated": {"folds": FOLDS, "folded_by": "document", "k": k,
                            "objective": "top-k hit of an answer-bearing sentence, mean over sources",
                            "settings": table,
                            "fused_minus_prior_alone": {"difference": diff, "low": low, "high": high},
                            "prior_alone": table[prior_key], "attention_alone": table[alone_key],
                            "fused": table[fused_key]},
        "score_end": {"chosen_margin": float(margin), "by_margin": margins,
                      "note": "in-sample (the fused ranker saw these questions); spans from the top-k fused "
                              "sentences, sentence F1 against the evidence labels, mean over sources"},
        "items": {s: sources.count(s) for s in sorted(set(sources))},
        "squad_articles": sorted({it.group for it in items if it.source == "squad"}),
        "swiftkv_layer": sw,
        "source": "training splits only: nq train (after fit-prior's questions), hotpotqa train, squad: the LoRA "
                  "article's questions held out of LoRA training and the second training article's",
        "seconds": round(time.time() - t0, 1),
    }
    target_dir = Path(out).parent if out else folder
    fused.save(target_dir / RANKER_FILE, {"source": report["source"], "fit": fused_key})
    alone.save(target_dir / ALONE_FILE, {"source": report["source"], "fit": alone_key})
    settings_path = Path(out) if out else folder / ADAPTER_SETTINGS
    update_settings(settings_path, lambda s: s.update(
        {"attention": {"file": RANKER_FILE, "alone": ALONE_FILE, "score_end_margin": float(margin), "fit": report}}))
    return report


def fused_scores(item: AttentionItem, ranker: AttentionRanker) -> np.ndarray:
    """The search's per-sentence scores for one item, exactly as the grounder fuses them (``AttentionRanker.fused``)."""
    import torch

    from cfic.decoding.attention import SentenceAttention

    def attention(a: np.ndarray) -> SentenceAttention:
        return SentenceAttention(torch.from_numpy(a[0]), torch.from_numpy(a[1]), torch.from_numpy(item.tokens))

    null = attention(item.null_attention) if ranker.calibrated else None
    return ranker.fused(torch.from_numpy(item.log_prior), 0, attention(item.attention), null).numpy()


def score_end_study(items: Sequence[AttentionItem], ranker: AttentionRanker, k: int, budget: int,
                    margins: Sequence[float] = SCORE_END_MARGINS) -> dict[str, dict[str, float]]:
    """For each margin of :func:`cfic.decoding.skip.score_span_end`: sentence F1 against the evidence labels, answer
    hit and sentences returned, with spans from the top-``k`` fused sentences (merged when they overlap)."""
    out = {}
    for m in margins:
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for it in items:
            f = fused_scores(it, ranker)
            chosen = np.zeros(len(f), dtype=bool)
            for s in np.argsort(-f, kind="stable")[:k]:
                used, end = it.tokens[s], s + 1
                while end < len(f) and used + it.tokens[end] <= budget and f[end] >= f[s] - m:
                    used += it.tokens[end]
                    end += 1
                chosen[s:end] = True
            tp = float((chosen & it.evidence).sum())
            f1 = 2 * tp / (chosen.sum() + it.evidence.sum()) if tp else 0.0
            target = it.answer if it.answer.any() else it.evidence
            rows.setdefault(it.source, []).append((f1, float((chosen & target).any()), float(chosen.sum())))
        means = {src: np.mean(np.array(v), axis=0) for src, v in rows.items()}
        out[str(m)] = {"f1": float(np.mean([v[0] for v in means.values()])),
                       "answer_hit": float(np.mean([v[1] for v in means.values()])),
                       "sentences": float(np.mean([v[2] for v in means.values()]))}
    return out

"""Training-side study: does the attention ranker gain from neighbour features or within-document z-scores?
Cross-validated by document on cfic fit-attention's material, same objective (top-k hit, mean over sources)."""
import json
import sys
from pathlib import Path

import numpy as np

from cfic.training import attention_data
from cfic.training.fit_attention import (
    FUSION_GRID,
    _by_source,
    _feature_mask,
    _log_softmax,
    document_folds,
    features,
    fit_weights,
    top_hit,
)

items = list(attention_data.load(sys.argv[1]))
sw = 24 if len(sys.argv) < 3 else int(sys.argv[2])
shape = items[0].attention.shape[:3]
base_mask = _feature_mask(shape, False, sw)
EPSL = np.log(1e-4)

def shifted(x, d):
    out = np.full_like(x, EPSL)
    if d > 0:
        out[d:] = x[:-d]
    else:
        out[:d] = x[-d:]
    return out

def variant_features(it, name):
    x = features(it, False)  # [S, F+1]
    att, length = x[:, :-1], x[:, -1:]
    if name == "base":
        return x, base_mask
    m = base_mask[:-1]
    if name == "z":
        mu, sd = att.mean(0, keepdims=True), att.std(0, keepdims=True) + 1e-3
        return np.concatenate([(att - mu) / sd, length], 1), base_mask
    if name == "base+z":
        mu, sd = att.mean(0, keepdims=True), att.std(0, keepdims=True) + 1e-3
        return np.concatenate([att, (att - mu) / sd, length], 1), np.concatenate([m, m, [True]])
    if name == "neighbours":
        return (np.concatenate([att, shifted(att, 1), shifted(att, -1), length], 1),
                np.concatenate([m, m, m, [True]]))
    raise KeyError(name)

k = 3
folds = document_folds(items, 5, 0)
sources = [it.source for it in items]
target = [it.answer if it.answer.any() else it.evidence for it in items]
results = {}
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["base", "z", "base+z", "neighbours"]
for name in variants:
    xm = [variant_features(it, name) for it in items]
    x, mask = [a for a, _ in xm], xm[0][1]
    for l2 in (3e-3, 1e-2, 3e-2):
        alone = [False] * len(items)
        fused = {f: [False] * len(items) for f in FUSION_GRID}
        fused5 = {f: [False] * len(items) for f in FUSION_GRID}
        for f in range(5):
            tr = [i for i in range(len(items)) if folds[i] != f]
            w = fit_weights([x[i] for i in tr], [items[i].evidence for i in tr], l2, mask)
            for i in np.flatnonzero(folds == f):
                a = _log_softmax(x[i] @ w)
                alone[i] = top_hit(a, target[i], k)
                for fu in FUSION_GRID:
                    s = items[i].log_prior + fu * a
                    fused[fu][i] = top_hit(s, target[i], k)
                    fused5[fu][i] = top_hit(s, target[i], 5)
        key = f"{name}/{l2}"
        results[key + "/alone"] = _by_source(items, alone)
        for fu in FUSION_GRID:
            results[f"{key}/{fu}"] = _by_source(items, fused[fu])
            results[f"{key}/{fu}@5"] = _by_source(items, fused5[fu])
        best = max((kk for kk in results if kk.startswith(key + "/") and "@" not in kk and "alone" not in kk),
                   key=lambda kk: np.mean(list(results[kk].values())))
        print(key, "alone", {s: round(v, 3) for s, v in results[key + "/alone"].items()},
              "best", best, {s: round(v, 3) for s, v in results[best].items()},
              round(float(np.mean(list(results[best].values()))), 4), flush=True)
        for fu in FUSION_GRID:
            r, r5 = results[f"{key}/{fu}"], results[f"{key}/{fu}@5"]
            print(f"   fusion {fu}: @3 mean {np.mean(list(r.values())):.4f} nq {r['nq']:.3f} hp {r['hotpotqa']:.3f}"
                  f" sq {r['squad']:.3f} | @5 nq {r5['nq']:.3f} hp {r5['hotpotqa']:.3f} sq {r5['squad']:.3f}")
Path(sys.argv[1].rstrip("/") + "-study.json").write_text(json.dumps({"results": results}, indent=1))

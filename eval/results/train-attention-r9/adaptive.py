"""Training-side study: a fusion weight that depends on the question's two rankings (how peaked the attention's and
the prior's distributions are) or on the document's sentence count. Out-of-fold attention log-probabilities from the
shipped recipe (plain, alone, l2 0.01); the fusion rule's parameters are chosen on four folds' questions and scored on
the fifth (nested), so the reported hit rate is out of sample for the rule too."""
import sys

import numpy as np
from common import mean_by_source as _mean
from common import out_of_fold_attention

from cfic.eval.compare import paired_bootstrap
from cfic.training import attention_data
from cfic.training.fit_attention import _by_source, _log_softmax, top_hit

items = list(attention_data.load(sys.argv[1]))
folds, target, att = out_of_fold_attention(items)


def entropy(lp):
    p = np.exp(lp)
    return float(-(p * lp).sum())


def peak(lp):  # gap between best and third best
    s = np.sort(lp)[::-1]
    return float(s[0] - s[min(2, len(s) - 1)])


feat = {
    "H_att": np.array([entropy(a) / np.log(len(a)) for a in att]),
    "H_prior": np.array([entropy(_log_softmax(it.log_prior)) / np.log(len(it.log_prior)) for it in items]),
    "gap_att": np.array([peak(a) for a in att]),
    "gap_prior": np.array([peak(_log_softmax(it.log_prior)) for it in items]),
    "log_n": np.array([np.log(len(it.log_prior)) for it in items]),
}
for k, v in feat.items():
    print(k, {s: round(float(np.mean([v[i] for i in range(len(items)) if items[i].source == s])), 3)
              for s in ("nq", "hotpotqa", "squad")})
z = {k: (v - v.mean()) / (v.std() + 1e-9) for k, v in feat.items()}
FU = (0.5, 1.0, 2.0, 4.0)
G = (-1.0, -0.5, 0.0, 0.5, 1.0)

def hits(fu, name, g, idx):
    out = []
    for i in idx:
        scale = fu * np.exp(g * z[name][i]) if name else fu
        out.append(top_hit(items[i].log_prior + scale * att[i], target[i], 3))
    return out

def mean_by_source(idx, h):
    return _mean(items, idx, h)


rules = [(fu, None, 0.0) for fu in FU] + [(fu, n, g) for fu in FU for n in z for g in G if g != 0.0]
every = np.arange(len(items))
for family in [None, *z]:
    cand = [r for r in rules if r[1] in (None, family)]
    nested = np.zeros(len(items), dtype=bool)
    picks = []
    for f in range(5):
        tr, te = every[folds != f], every[folds == f]
        best = max(cand, key=lambda r: mean_by_source(tr, hits(*r, tr)))
        picks.append(best)
        nested[te] = hits(*best, te)
    prior = [top_hit(items[i].log_prior, target[i], 3) for i in every]
    d, lo, hi = paired_bootstrap([float(h) for h in nested], [float(h) for h in prior],
                                 strata=[it.source for it in items])
    print(f"{family or 'constant'}: nested {mean_by_source(every, list(nested)):.4f}",
          {s: round(v, 3) for s, v in _by_source(items, list(nested)).items()},
          f"vs prior {d:+.3f} [{lo:+.3f},{hi:+.3f}]", "picks", picks, flush=True)

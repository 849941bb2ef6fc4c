"""Training-side study (round 9): does the attention's paragraph-level reading add to the fusion? QRHead-style heads
were made for passage retrieval: a sentence's paragraph log-probability (logsumexp of the attention log-probability
over the paragraph's sentences) is added with its own weight next to round 9's fusion. Out-of-fold attention
log-probabilities (plain, alone, l2 0.01, folded by document); the rule's weights are chosen on four folds'
questions and scored on the fifth (nested)."""
import sys
import numpy as np
from cfic.grounder import Grounder
from cfic.prior import paragraph_bounds
from cfic.training import attention_data
from cfic.training.adapter_files import adapter_folder
from cfic.training.fit_attention import (features, _feature_mask, fit_weights, _log_softmax, top_hit,
                                         document_folds, _by_source)
from cfic.eval.compare import paired_bootstrap
from pathlib import Path

folder = Path(sys.argv[1])
g = Grounder.from_pretrained(None, adapter=adapter_folder(None, "x"), abstention=None, attention=None)
examples = attention_data.training_examples(200, 100, 200, n_squad_second=400)
items, para = [], []
paths = sorted(p for p in folder.glob("[0-9]*.npz") if ".tmp" not in p.name)
loaded = list(attention_data.load(folder))
for path, it in zip(paths, loaded):
    ex = examples[int(path.stem)][1]
    text = ex.documents[0]
    sents = g.split(text)
    assert len(sents) == len(it.log_prior), (path, len(sents), len(it.log_prior))
    starts = np.array([a for a, _ in paragraph_bounds(text)])
    para.append(np.clip(np.searchsorted(starts, [s.start for s in sents], side="right") - 1, 0, None))
    items.append(it)
print("paragraphs per doc", {s: round(float(np.mean([p.max() + 1 for p, it in zip(para, items) if it.source == s])), 1)
                             for s in ("nq", "hotpotqa", "squad")}, flush=True)
shape = items[0].attention.shape[:3]
mask = _feature_mask(shape, False, 15)
folds = document_folds(items, 5, 0)
x = [features(it, False) for it in items]
target = [it.answer if it.answer.any() else it.evidence for it in items]
att = [None] * len(items)
for f in range(5):
    tr = [i for i in range(len(items)) if folds[i] != f]
    w = fit_weights([x[i] for i in tr], [items[i].evidence for i in tr], 0.01, mask)
    for i in np.flatnonzero(folds == f):
        att[i] = _log_softmax(x[i] @ w)

def para_term(i):
    a, p = att[i], para[i]
    m = np.full(p.max() + 1, -np.inf)
    np.logaddexp.at(m, p, a)
    t = m[p]
    return t - t.max()

pt = [para_term(i) for i in range(len(items))]
def hits(fu, pw, gp, idx):
    out = []
    for i in idx:
        n = len(att[i]); scale = (n / 64) ** pw
        s = items[i].log_prior + fu * scale * (att[i] - att[i].max()) + gp * scale * pt[i]
        out.append(top_hit(s, target[i], 3))
    return out
def mean_by_source(idx, h):
    return float(np.mean(list(_by_source([items[i] for i in idx], h).values())))
every = np.arange(len(items))
prior = [top_hit(it.log_prior, t, 3) for it, t in zip(items, target)]
rules_all = [(fu, pw, gp) for fu in (0.0, 1.0, 2.0, 4.0) for pw in (0.0, -1.0, -1.5) for gp in (0.0, 0.5, 1.0, 2.0, 4.0)
             if not (fu == 0 and gp == 0 and pw != 0)]
for name, rules in (("sentence only", [r for r in rules_all if r[2] == 0.0]), ("with paragraph", rules_all),
                    ("paragraph only", [r for r in rules_all if r[0] == 0.0])):
    nested, picks = np.zeros(len(items), dtype=bool), []
    for f in range(5):
        tr, te = every[folds != f], every[folds == f]
        best = max(rules, key=lambda r: mean_by_source(tr, hits(*r, tr)))
        picks.append(best); nested[te] = hits(*best, te)
    d, lo, hi = paired_bootstrap([float(h) for h in nested], [float(h) for h in prior], strata=[it.source for it in items])
    print(f"{name}: nested {mean_by_source(every, list(nested)):.4f}",
          {s: round(v, 3) for s, v in _by_source(items, list(nested)).items()},
          f"vs prior {d:+.3f} [{lo:+.3f},{hi:+.3f}] picks {picks}", flush=True)
for r in [(4.0, -1.5, 0.0), (4.0, -1.5, 1.0), (4.0, -1.5, 2.0), (2.0, -1.5, 2.0), (0.0, 0.0, 2.0), (0.0, -1.5, 4.0)]:
    h = hits(*r, every)
    print(r, round(mean_by_source(every, h), 4), {s: round(v, 3) for s, v in _by_source(items, h).items()})

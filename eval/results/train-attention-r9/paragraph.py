"""Training-side study (round 9): does the attention's paragraph-level reading add to the fusion? QRHead-style heads
were made for passage retrieval: a sentence's paragraph log-probability (logsumexp of the attention log-probability
over the paragraph's sentences) is added with its own weight next to round 9's fusion. Out-of-fold attention
log-probabilities (plain, alone, l2 0.01, folded by document); the rule's weights are chosen on four folds'
questions and scored on the fifth (nested)."""
import sys
from pathlib import Path

import numpy as np
from common import mean_by_source as _mean
from common import out_of_fold_attention

from cfic.eval.compare import paired_bootstrap
from cfic.grounder import Grounder
from cfic.prior import paragraph_bounds
from cfic.training import attention_data
from cfic.training.adapter_files import adapter_folder
from cfic.training.fit_attention import _by_source, top_hit

folder = Path(sys.argv[1])
g = Grounder.from_pretrained(None, adapter=adapter_folder(None, "x"), abstention=None, attention=None)
examples = attention_data.training_examples(200, 100, 200, n_squad_second=400)
items, para = [], []
paths = sorted(p for p in folder.glob("[0-9]*.npz") if ".tmp" not in p.name)
loaded = list(attention_data.load(folder))
for path, it in zip(paths, loaded, strict=True):
    ex = examples[int(path.stem)][1]
    text = ex.documents[0]
    sents = g.split(text)
    assert len(sents) == len(it.log_prior), (path, len(sents), len(it.log_prior))
    starts = np.array([a for a, _ in paragraph_bounds(text)])
    para.append(np.clip(np.searchsorted(starts, [s.start for s in sents], side="right") - 1, 0, None))
    items.append(it)
counts = {s: [p.max() + 1 for p, it in zip(para, items, strict=True) if it.source == s]
          for s in ("nq", "hotpotqa", "squad")}
print("paragraphs per doc", {s: round(float(np.mean(v)), 1) for s, v in counts.items()}, flush=True)
folds, target, att = out_of_fold_attention(items)


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
        scale = (len(att[i]) / 64) ** pw
        s = items[i].log_prior + fu * scale * (att[i] - att[i].max()) + gp * scale * pt[i]
        out.append(top_hit(s, target[i], 3))
    return out
def mean_by_source(idx, h):
    return _mean(items, idx, h)

every = np.arange(len(items))
prior = [top_hit(it.log_prior, t, 3) for it, t in zip(items, target, strict=True)]
rules_all = [(fu, pw, gp) for fu in (0.0, 1.0, 2.0, 4.0) for pw in (0.0, -1.0, -1.5) for gp in (0.0, 0.5, 1.0, 2.0, 4.0)
             if not (fu == 0 and gp == 0 and pw != 0)]
for name, rules in (("sentence only", [r for r in rules_all if r[2] == 0.0]), ("with paragraph", rules_all),
                    ("paragraph only", [r for r in rules_all if r[0] == 0.0])):
    nested, picks = np.zeros(len(items), dtype=bool), []
    for f in range(5):
        tr, te = every[folds != f], every[folds == f]
        best = max(rules, key=lambda r: mean_by_source(tr, hits(*r, tr)))
        picks.append(best)
        nested[te] = hits(*best, te)
    d, lo, hi = paired_bootstrap([float(h) for h in nested], [float(h) for h in prior],
                                 strata=[it.source for it in items])
    print(f"{name}: nested {mean_by_source(every, list(nested)):.4f}",
          {s: round(v, 3) for s, v in _by_source(items, list(nested)).items()},
          f"vs prior {d:+.3f} [{lo:+.3f},{hi:+.3f}] picks {picks}", flush=True)
for r in [(4.0, -1.5, 0.0), (4.0, -1.5, 1.0), (4.0, -1.5, 2.0), (2.0, -1.5, 2.0), (0.0, 0.0, 2.0), (0.0, -1.5, 4.0)]:
    h = hits(*r, every)
    print(r, round(mean_by_source(every, h), 4), {s: round(v, 3) for s, v in _by_source(items, h).items()})

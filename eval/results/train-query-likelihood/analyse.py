"""Analyse study.py's material: top-n sentence hit (answer / gold) for the prior alone and the prior fused with the
paragraph question likelihood, the weight chosen by 5-fold cross-validation on the training questions themselves.
Paired bootstrap of the fused − prior difference on the held-out folds' picks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent / "material"
WEIGHTS = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])


def load(source: str, paragraphs: int = 8) -> list[dict[str, np.ndarray]]:
    """The study's questions, as if only the first ``paragraphs`` of the 8 read had been read."""
    out = []
    for p in sorted((HERE / source).glob("*.npz")):
        q = dict(np.load(p))
        q["top"], q["ql_upr"] = q["top"][:paragraphs], q["ql_upr"][:paragraphs]
        out.append(q)
    return out


def fused(q: dict[str, np.ndarray], w: float, key: str) -> np.ndarray:
    """Sentence score: log prior + w · standardised question likelihood of its paragraph (paragraphs outside the
    top-M read get the lowest read value, so reading can only promote)."""
    ql = q[key].astype(np.float64)
    z = (ql - ql.mean()) / (ql.std() + 1e-6)
    per_par = np.full(int(q["para_of"].max()) + 1, z.min())
    per_par[q["top"]] = z
    return q["log_prior"] + w * per_par[q["para_of"]]


def hit(q: dict[str, np.ndarray], scores: np.ndarray, n: int, label: str) -> float:
    top = np.argsort(-scores, kind="stable")[:n]
    return float(q[label][top].any())


def cross_validated(qs, n: int, label: str, key: str, folds: int = 5) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Per-question hit of the prior and of the fusion at the weight fitted on the other folds."""
    idx = np.arange(len(qs))
    fold = idx % folds
    base = np.array([hit(q, q["log_prior"], n, label) for q in qs])
    table = np.array([[hit(q, fused(q, w, key), n, label) for w in WEIGHTS] for q in qs])
    out, chosen = np.zeros(len(qs)), []
    for f in range(folds):
        train = fold != f
        w = int(np.argmax(table[train].mean(0)))
        chosen.append(float(WEIGHTS[w]))
        out[fold == f] = table[fold == f, w]
    return base, out, chosen


def bootstrap(diff: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(rounds)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(source: str) -> None:
    qs = load(source)
    keys = [k for k in qs[0] if k.startswith("ql_")]
    print(f"{source}: {len(qs)} questions, keys {keys}")
    for label in ("answer", "gold"):
        usable = [q for q in qs if q[label].any()]
        for n in (1, 3, 5):
            for key in keys:
                base, fuse, chosen = cross_validated(usable, n, label, key)
                lo, hi = bootstrap(fuse - base)
                alone = np.mean([hit(q, fused(q, 1e6, key), n, label) for q in usable])
                print(f"  {label:6s} top-{n} n={len(usable)}: prior {base.mean():.3f}  ql alone {alone:.3f}  "
                      f"fused(cv) {fuse.mean():.3f}  diff {fuse.mean() - base.mean():+.3f} [{lo:+.3f},{hi:+.3f}]  "
                      f"w {chosen}")


def by_weight(sources: list[str], n: int = 3) -> None:
    """Top-n hit of every weight on each source's questions (in-sample: the table one shared weight is read from)."""
    print(f"top-{n} hit by weight: " + " ".join(f"{w:g}" for w in WEIGHTS))
    for source in sources:
        qs = load(source)
        for label in ("answer", "gold"):
            usable = [q for q in qs if q[label].any()]
            row = [np.mean([hit(q, fused(q, w, "ql_upr"), n, label) for q in usable]) for w in WEIGHTS]
            print(f"  {source:9s} {label:6s} " + " ".join(f"{v:.3f}" for v in row))


def choose(sources: list[str], n: int = 3, paragraphs: int = 8) -> float:
    """The shipped weight: the best mean over sources of the top-n gold-sentence hit (the start search's top_k),
    ties to the smaller weight; then the mean answer hit at that weight, and the prior's, for the record."""
    gold, answer = [], []
    for source in sources:
        qs = load(source, paragraphs)
        for label, table in (("gold", gold), ("answer", answer)):
            usable = [q for q in qs if q[label].any()]
            table.append([np.mean([hit(q, fused(q, w, "ql_upr"), n, label) for q in usable]) for w in WEIGHTS])
    mean = np.mean(gold, 0)
    best = int(np.argmax(mean))
    print(f"{paragraphs} paragraphs read: best weight {WEIGHTS[best]:g}: mean top-{n} gold hit {mean[best]:.3f} "
          f"(prior {mean[0]:.3f}); "
          f"answer hit {np.mean(answer, 0)[best]:.3f} (prior {np.mean(answer, 0)[0]:.3f})")
    return float(WEIGHTS[best])


if __name__ == "__main__":
    if sys.argv[1] == "choose":
        # The fewest paragraphs (the reading's cost) whose best mean is within half a point of reading all 8.
        for m in (2, 3, 4, 6, 8):
            choose(sys.argv[2:], paragraphs=m)
        sys.exit()
    if sys.argv[1] == "weights":
        by_weight(sys.argv[2:], 3)
        by_weight(sys.argv[2:], 5)
        sys.exit()
    main(sys.argv[1])

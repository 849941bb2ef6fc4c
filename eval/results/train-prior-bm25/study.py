"""Training-side study (issue 29, round 11): does the sentence prior under-use BM25?

HotpotQA's training bridge questions showed BM25's top sentences holding the answer far more often than the prior's
at the same count (span-policy study, ``hotpotqa-hop``: 0.538 vs 0.308 at ~5 sentences), while the prior's fitted
BM25 weight is 1 against 20 for the sentence cosine. HotpotQA questions copy rare phrases from both paragraphs;
NQ's are short and BM25 is weak there. This study collects the prior's signals LM-free (embedder and BM25 only) on
every training source and shows each weighting's top-n answer / gold-sentence hit per source (a grid, no fit):

    .venv/bin/python eval/results/train-prior-bm25/study.py collect   # -> material.jsonl.gz (embeddings only, ~8 min)
    .venv/bin/python eval/results/train-prior-bm25/study.py analyse   # -> analyse.txt

Variants: the BM25 weight alone; and the BM25 weight scaled by the question's match strength (the best raw BM25
score in the document over the number of the question's terms, so a question whose rare words occur in one
sentence trusts BM25 more).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

HERE = Path(__file__).parent
SOURCES = {"nq": (0, 400), "nq-fresh": (460, 660), "hotpotqa": (0, 100), "squad": (0, 916)}


def collect() -> None:
    from cfic import Grounder
    from cfic.eval import load_split
    from cfic.eval.metrics import contains_answer, select_units
    from cfic.prior import SentencePrior

    grounder = Grounder.from_pretrained()
    prior = grounder.sentence_prior
    rows = []
    cache: dict[str, tuple] = {}
    for source, (a, b) in SOURCES.items():
        examples = load_split(source.split("-")[0], "train")[a:b]
        for ex in tqdm(examples, desc=source):
            if not ex.answerable:
                continue
            key = ex.doc_key or ex.id
            if key not in cache:
                cache = {} if source != "squad" else cache
                text = ex.documents[0]
                sentences = grounder.split(text)
                cache[key] = (text, sentences, prior.features(text, sentences))
            text, sentences, feats = cache[key]
            sig = SentencePrior.signals(ex.question, prior.query_vector(ex.question), feats)
            raw = feats.bm25.scores(ex.question)
            terms = len(set(ex.question.lower().split()))
            units = [(0, s.start, s.end) for s in sentences]
            gold = select_units(units, [g for g in ex.gold if g[0] == 0]) if ex.gold else set()
            rows.append({"source": source, "id": ex.id, "signals": sig.tolist(), "raw_top": float(raw.max()),
                         "terms": terms, "answer": [contains_answer(s.text, ex.answers) for s in sentences],
                         "gold": sorted(gold)})
    with gzip.open(HERE / "material.jsonl.gz", "wt") as f:  # 5 decimals: the file stays small enough for git
        for r in rows:
            r["signals"] = np.round(np.asarray(r["signals"]), 5).tolist()
            f.write(json.dumps(r) + "\n")


def _hit(scores: np.ndarray, mask: np.ndarray, n: int) -> float:
    return float(mask[np.argsort(-scores, kind="stable")[:n]].any())


def analyse() -> None:
    from cfic.prior import PriorWeights

    shipped = json.loads((Path(__file__).parents[3] / "cfic/data/adapter/cfic.json").read_text())["prior"]["weights"]
    base = PriorWeights.from_dict(shipped).signal_weights
    with gzip.open(HERE / "material.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r["signals"] = np.asarray(r["signals"], dtype=np.float32)
        r["answer"] = np.asarray(r["answer"], dtype=bool)
        g = np.zeros(len(r["answer"]), dtype=bool)
        g[r["gold"]] = True
        r["gold"] = g
        r["strength"] = r["raw_top"] / max(r["terms"], 1)
    strengths = np.array([r["strength"] for r in rows])
    print(f"{len(rows)} questions; match strength (best raw BM25 / question terms) median {np.median(strengths):.2f}")
    for src in SOURCES:
        s = [r["strength"] for r in rows if r["source"] == src]
        print(f"  {src}: n={len(s)} strength median {np.median(s):.2f}")

    def score(bm25_w: float, power: float, n: int, field: str) -> dict[str, float]:
        out = {}
        for src in SOURCES:
            hits = []
            for r in rows:
                if r["source"] != src or not r[field].any():
                    continue
                w = base.copy()
                w[2] = bm25_w * (r["strength"] / np.median(strengths)) ** power
                hits.append(_hit(r["signals"] @ w, r[field], n))
            out[src] = float(np.mean(hits))
        return out

    print("\nbm25 weight x (strength / median)^power; top-n hit by source (answer sentence | gold sentence)")
    print("w  power  n | nq  nq-fresh  hotpotqa  squad (answer) | nq  nq-fresh  hotpotqa  squad (gold)")
    for n in (3, 5):
        for w in (1.0, 2.0, 4.0, 8.0, 16.0):
            for power in ((0.0,) if w == 1.0 else (0.0, 1.0, 2.0)):
                a = score(w, power, n, "answer")
                g = score(w, power, n, "gold")
                print(f"{w:4.0f} {power:.0f} {n} | " + "  ".join(f"{a[s]:.3f}" for s in SOURCES) + " | "
                      + "  ".join(f"{g[s]:.3f}" for s in SOURCES))


if __name__ == "__main__":
    {"collect": collect, "analyse": analyse}[sys.argv[1]]()

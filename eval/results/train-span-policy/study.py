"""Training-side study: spend cfic's evidence budget on more, shorter spans?

The baselines get cfic's sentence count as that many independent picks; cfic spends it on ``top_k`` starts and the
sentences each span adds. Here every (``top_k``, span end) setting is run on the same encodings and scored against
the prior's top-N sentences at *that setting's own* sentence count N, paired per question: the comparison
``cfic evaluate`` makes, for every setting at once.  Span ends: skip decoding (the reference) or the score span end
at a margin (no forward pass).  Writes one JSON line per question (resumable); ``analyse`` prints the table.

    .venv/bin/python eval/results/train-span-policy/study.py run nq 100
    .venv/bin/python eval/results/train-span-policy/study.py analyse nq
    .venv/bin/python eval/results/train-span-policy/study.py run nq 60 wide   # -> nq-wide.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cfic import Grounder
from cfic.eval import load_split
from cfic.eval.generic import Example
from cfic.eval.metrics import contains_answer, sentence_prf
from cfic.prior import SentencePrior
from cfic.retrieval.bm25 import BM25
from cfic.text import split_sentences

HERE = Path(__file__).parent
GRIDS = {  # name: (top_k values, margins; None = skip decoding)
    "": ((3, 4, 5, 6), (None, 0.0, 0.5, 1.0, 2.0)),
    "wide": ((3, 4), (None, 4.0, 8.0, 16.0)),  # the margins above all end after ~1 sentence on NQ
    "hop": ((3, 4, 5, 6), (None, 0.5, 2.0, 4.0, 8.0, 16.0)),  # HotpotQA: also a second hop, BM25 and F1 (round 11)
    "article": ((3, 4), (None, 4.0, 8.0, 16.0)),  # SQuAD's training articles (one long document, many questions)
}
HOP_TOP_KS = (3, 4, 5)  # the "hop" grid also runs hops=2 (skip decoding) at these top_k


def _f1(units: list, gold: tuple, picked: list) -> float | None:
    prf = sentence_prf(units, gold, picked)
    return None if prf is None else prf[2]


def _hit(ex: Example, text: str) -> bool | None:
    return contains_answer(text, ex.answers) if ex.answers else None


def _top(ex: Example, where: list, units: list, ranking: list[int], n: int) -> tuple[bool | None, float | None]:
    """Answer hit and sentence F1 of a baseline's top ``n`` sentences (indices into ``where``)."""
    picked = ranking[:n]
    return (_hit(ex, "\n".join(where[i][1].text for i in picked)),
            _f1(units, ex.gold, [(where[i][0], where[i][1].start, where[i][1].end) for i in picked]))


def run(source: str, n: int, grid: str = "") -> None:
    grounder = Grounder.from_pretrained()
    top_ks, margins = GRIDS[grid]
    out = HERE / f"{source}{'-' + grid if grid else ''}.jsonl"
    done = {json.loads(line)["id"] for line in out.read_text().splitlines()} if out.exists() else set()
    # The "hop" grid keeps HotpotQA's yes/no questions (no answer string: F1 only).
    examples = [e for e in load_split(source, "train")[:n] if e.answers or (grid == "hop" and e.gold)]
    if grid == "article":  # answerable questions only, the articles' question order
        examples = [e for e in load_split(source, "train") if e.answerable and e.answers][:n]
    cached: dict[str, list] = {}  # SQuAD: every question of an article reads the same encoding
    with out.open("a") as f:
        for ex in tqdm(examples, desc=source):
            if ex.id in done:
                continue
            key = ex.doc_key or ex.id
            if key not in cached:
                cached = {key: grounder.encode(ex.documents)}
            encodings = cached[key]
            signals = grounder._signals(ex.question, encodings)
            log_prior = np.concatenate(SentencePrior.log_priors(signals, grounder.config.prior))
            where = [(d, s) for d, e in enumerate(encodings) for s in e.sentences]  # (document, Sentence)
            texts = [s.text for _, s in where]
            order = np.argsort(-log_prior, kind="stable")
            bm25_order = BM25(texts).rank([ex.question], len(texts))[0] if grid in ("hop", "article") else []
            # The evaluation's reference sentences, so F1 here is `cfic evaluate`'s sentence F1.
            units = [(d, s.start, s.end) for d, text in enumerate(ex.documents) for s in split_sentences(text)]

            settings = [(k, m, 1) for k in top_ks for m in margins]
            if grid == "hop":
                settings += [(k, None, 2) for k in HOP_TOP_KS]
            row = {"id": ex.id, "settings": {}}
            for top_k, margin, hops in settings:
                r = grounder.ground(ex.question, encodings, top_k=top_k, score_end_margin=margin, hops=hops,
                                    abstain=False)
                chosen = {(e.document_index, i) for e in r.evidence for i in range(e.sentence_start,
                                                                                    e.sentence_end)}
                budget = len(chosen)
                prior_hit, prior_f1 = _top(ex, where, units, list(order), budget)
                cell = {"hit": _hit(ex, "\n".join(e.text for e in r.evidence)),
                        "prior_hit": prior_hit, "sentences": budget,
                        "tokens": sum(len(grounder.tokenizer(e.text)["input_ids"]) for e in r.evidence),
                        "ms": r.usage.latency_ms}
                if bm25_order:
                    bm25_hit, bm25_f1 = _top(ex, where, units, bm25_order, budget)
                    cell.update(f1=_f1(units, ex.gold, [(e.document_index, e.start_char, e.end_char)
                                                        for e in r.evidence]),
                                prior_f1=prior_f1, bm25_hit=bm25_hit, bm25_f1=bm25_f1)
                row["settings"][f"{top_k}/{margin}" + ("/hop2" if hops > 1 else "")] = cell
            f.write(json.dumps(row) + "\n")
            f.flush()


def _paired(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> str:
    diff = a - b
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"


def analyse(name: str) -> None:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    if "f1" in rows[0]["settings"][next(iter(rows[0]["settings"]))]:
        return analyse_hop(name, rows)
    rng = np.random.default_rng(0)
    print(f"{name}: {len(rows)} answerable training questions")
    print("setting (top_k/margin)  cfic  prior@budget  diff [95%]  sentences  tokens  ms")
    for key in rows[0]["settings"]:
        hit = np.array([r["settings"][key]["hit"] for r in rows], dtype=float)
        prior = np.array([r["settings"][key]["prior_hit"] for r in rows], dtype=float)
        mean = {k: np.mean([r["settings"][key][k] for r in rows]) for k in ("sentences", "tokens", "ms")}
        print(f"{key:>10s}  {hit.mean():.3f}  {prior.mean():.3f}  {_paired(hit, prior, rng)}  "
              f"{mean['sentences']:.1f}  {mean['tokens']:.0f}  {mean['ms']:.0f}")


def _column(rows: list[dict], key: str, field: str) -> np.ndarray:
    return np.array([float(r["settings"][key][field] or 0.0) for r in rows])


def analyse_hop(name: str, rows: list[dict]) -> None:
    """Answer recall (HotpotQA: on the bridge questions) against the best of prior and BM25 at the same budget, and
    sentence F1 on all, each paired."""
    first = next(iter(rows[0]["settings"]))
    bridge = ({e.id for e in load_split("hotpotqa-bridge", "train")} if name.startswith("hotpotqa")
              else {r["id"] for r in rows})  # elsewhere: answer recall on every question
    on_bridge = [r for r in rows if r["id"] in bridge and r["settings"][first]["hit"] is not None]
    rng = np.random.default_rng(0)
    what = "bridge" if name.startswith("hotpotqa") else "answer"
    print(f"{name}: {len(rows)} training questions, {len(on_bridge)} {what} questions with an answer string")
    print(f"setting  | {what} recall: cfic  prior  bm25  cfic-bm25 [95%]  cfic-prior [95%] | "
          "F1 (all): cfic  prior  bm25  cfic-prior [95%] | sentences  tokens  ms")
    for key in rows[0]["settings"]:
        hit, prior, bm25 = (_column(on_bridge, key, f) for f in ("hit", "prior_hit", "bm25_hit"))
        f1, prior_f1, bm25_f1 = (_column(rows, key, f) for f in ("f1", "prior_f1", "bm25_f1"))
        mean = {k: _column(rows, key, k).mean() for k in ("sentences", "tokens", "ms")}
        print(f"{key:>12s} | {hit.mean():.3f}  {prior.mean():.3f}  {bm25.mean():.3f}  {_paired(hit, bm25, rng)}  "
              f"{_paired(hit, prior, rng)} | {f1.mean():.3f}  {prior_f1.mean():.3f}  {bm25_f1.mean():.3f}  "
              f"{_paired(f1, prior_f1, rng)} | {mean['sentences']:.1f}  {mean['tokens']:.0f}  {mean['ms']:.0f}")


if __name__ == "__main__":
    {"run": lambda: run(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]),
     "analyse": lambda: analyse(sys.argv[2])}[sys.argv[1]]()

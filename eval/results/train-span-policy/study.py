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
from cfic.eval.metrics import contains_answer
from cfic.prior import SentencePrior

HERE = Path(__file__).parent
GRIDS = {  # name: (top_k values, margins; None = skip decoding)
    "": ((3, 4, 5, 6), (None, 0.0, 0.5, 1.0, 2.0)),
    "wide": ((3, 4), (None, 4.0, 8.0, 16.0)),  # the margins above all end after ~1 sentence on NQ
}


def run(source: str, n: int, grid: str = "") -> None:
    grounder = Grounder.from_pretrained()
    top_ks, margins = GRIDS[grid]
    out = HERE / f"{source}{'-' + grid if grid else ''}.jsonl"
    done = {json.loads(line)["id"] for line in out.read_text().splitlines()} if out.exists() else set()
    examples = [e for e in load_split(source, "train")[:n] if e.answers]
    with out.open("a") as f:
        for ex in tqdm(examples, desc=source):
            if ex.id in done:
                continue
            encodings = grounder.encode(ex.documents)
            signals = grounder._signals(ex.question, encodings)
            log_prior = np.concatenate(SentencePrior.log_priors(signals, grounder.config.prior))
            texts = [s.text for e in encodings for s in e.sentences]
            order = np.argsort(-log_prior, kind="stable")
            row = {"id": ex.id, "settings": {}}
            for top_k in top_ks:
                for margin in margins:
                    r = grounder.ground(ex.question, encodings, top_k=top_k, score_end_margin=margin, abstain=False)
                    chosen = {(e.document_index, i) for e in r.evidence for i in range(e.sentence_start,
                                                                                        e.sentence_end)}
                    budget = len(chosen)
                    prior_text = "\n".join(texts[i] for i in order[:budget])
                    row["settings"][f"{top_k}/{margin}"] = {
                        "hit": contains_answer("\n".join(e.text for e in r.evidence), ex.answers),
                        "prior_hit": contains_answer(prior_text, ex.answers), "sentences": budget,
                        "tokens": sum(len(grounder.tokenizer(e.text)["input_ids"]) for e in r.evidence),
                        "ms": r.usage.latency_ms}
            f.write(json.dumps(row) + "\n")
            f.flush()


def analyse(name: str) -> None:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    print(f"{name}: {len(rows)} answerable training questions")
    print("setting (top_k/margin)  cfic  prior@budget  diff [95%]  sentences  tokens  ms")
    for key in rows[0]["settings"]:
        hit = np.array([r["settings"][key]["hit"] for r in rows], dtype=float)
        prior = np.array([r["settings"][key]["prior_hit"] for r in rows], dtype=float)
        diff = hit - prior
        boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        mean = {k: np.mean([r["settings"][key][k] for r in rows]) for k in ("sentences", "tokens", "ms")}
        print(f"{key:>10s}  {hit.mean():.3f}  {prior.mean():.3f}  {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]  "
              f"{mean['sentences']:.1f}  {mean['tokens']:.0f}  {mean['ms']:.0f}")


if __name__ == "__main__":
    {"run": lambda: run(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]),
     "analyse": lambda: analyse(sys.argv[2])}[sys.argv[1]]()

"""The training-side study behind ``distinct_spans`` (off by default): ``cfic evaluate --split train`` with the
option on and off, every method side by side in each run. Reproduce with ``.venv/bin/python <this file>`` (~45 min
on 2 cores; the session that made these folders stopped before the SQuAD part, which the decision did not need)."""

from cfic.config import bound_kernel_caches
from cfic.eval.runner import evaluate
from cfic.grounder import Grounder

bound_kernel_caches()
base = Grounder.from_pretrained()
for dataset, n in (("hotpotqa", 100), ("nq", 60)):
    for name, distinct in (("on", True), ("off", False)):
        g = Grounder(base.loaded, base.config.with_options(distinct_spans=distinct), base.swiftkv,
                     sentence_prior=base.sentence_prior)
        out = f"eval/results/train-distinct-spans/{dataset}-train-{n}-distinct-{name}"
        evaluate(dataset, split="train", limit=n, methods="cfic,prior,embedding,bm25", out=out, grounder=g,
                 command=f"cfic evaluate --dataset {dataset} --split train --limit {n} --methods "
                         f"cfic,prior,embedding,bm25 --out {out}  (GroundingConfig(distinct_spans={distinct}))")

"""Training side: FFN skipping thresholds against the shipped default, warm questions on NQ training documents.

    .venv/bin/python eval/results/train-ffn-skip/ffn_study.py 0.9,0.95,0.98 25
    .venv/bin/python eval/results/train-ffn-skip/ffn_study.py 0.995,0.998,0.999 25

Per threshold: skip-pass and warm p50, how often the evidence equals the full model's, answer hits, and the share of
FFN blocks skipped in the skippable layers (counted by wrapping each study grounder's split-layer call: study
instrumentation, not part of the product).
"""

import statistics
import sys
import time

from cfic.config import bound_kernel_caches
from cfic.eval.datasets import load_split
from cfic.eval.metrics import contains_answer
from cfic.grounder import Grounder


def counting(runner, counts: dict[str, int]):
    inner = runner.run_layer_sparse_ffn

    def run(index, state, ffn_columns):
        counts["ran"] += int(ffn_columns.numel())
        counts["possible"] += int(state.hidden.shape[1])
        return inner(index, state, ffn_columns)

    return run


def main() -> None:
    bound_kernel_caches()
    base = Grounder.from_pretrained()
    thresholds = [float(t) for t in sys.argv[1].split(",")]
    examples = load_split("nq", "train")[1000:1000 + int(sys.argv[2])]
    grounders = {"full": base} | {
        f"ffn-{t}": Grounder(base.loaded, base.config.with_options(ffn_skip=t), base.swiftkv,
                             sentence_prior=base.sentence_prior) for t in thresholds}
    stats = {n: {"ms": [], "skip_ms": [], "same": 0, "hits": 0, "ran": 0, "possible": 0} for n in grounders}
    for name, g in grounders.items():
        g.runner.run_layer_sparse_ffn = counting(g.runner, stats[name])
    for ex in examples:
        enc = base.encode(list(ex.documents))
        ref = None
        for name, g in grounders.items():
            t = time.perf_counter()
            r = g.ground(ex.question, enc, abstain=False)
            stats[name]["ms"].append((time.perf_counter() - t) * 1000)
            stats[name]["skip_ms"].append(r.usage.skip_ms)
            evidence = [(e.document_index, e.sentence_start, e.sentence_end) for e in r.evidence]
            ref = evidence if name == "full" else ref
            stats[name]["same"] += evidence == ref
            stats[name]["hits"] += contains_answer(" ".join(e.text for e in r.evidence), ex.answers)
    for name, s in stats.items():
        skipped = 1 - s["ran"] / s["possible"] if s["possible"] else 0.0
        print(name, f"skip p50 {statistics.median(s['skip_ms']):.0f} ms, warm p50 {statistics.median(s['ms']):.0f} "
              f"ms, same evidence {s['same']}/{len(examples)}, answer hits {s['hits']}, FFN columns skipped "
              f"{skipped:.1%} of those in skippable layers", flush=True)


if __name__ == "__main__":
    main()

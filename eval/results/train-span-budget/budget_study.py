"""Training side: a shorter skip-decoding budget (``max_span_tokens``) against the shipped 128, same encodings.

    .venv/bin/python eval/results/train-span-budget/budget_study.py nq 40 96,112,128
    .venv/bin/python eval/results/train-span-budget/budget_study.py hotpotqa 40 96,112,128

The skip pass teacher-forces each of the top-k candidates' continuations up to the budget, so its cost is about
proportional to the budget; the question is what a shorter one costs in answer recall and sentence F1 (budgets below
the 96-token sentence cap would change the sentence split, hence the encoding, so they are not compared here).
Prints per budget: answer recall, sentence F1, evidence tokens, skip p50, warm p50 (question pass + searches).
"""

import statistics
import sys
import time

from cfic.config import bound_kernel_caches
from cfic.eval.datasets import load_split
from cfic.eval.metrics import Span, score_example
from cfic.eval.runner import _reference_units
from cfic.grounder import Grounder


def main() -> None:
    bound_kernel_caches()
    dataset, n, budgets = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
    g = Grounder.from_pretrained()
    start = 1000 if dataset == "nq" else 0  # NQ's first training items fitted the adapter; HotpotQA has 100 only
    examples = load_split(dataset, "train")[start:start + n]
    rows = {b: {"hit": [], "f1": [], "tokens": [], "skip": [], "warm": []} for b in budgets}
    for i, ex in enumerate(examples):
        enc = g.encode(list(ex.documents))
        units = _reference_units(ex.documents)
        for b in budgets:
            t = time.perf_counter()
            r = g.ground(ex.question, enc, max_span_tokens=b, abstain=False)
            warm = (time.perf_counter() - t) * 1000
            spans = [Span(e.document_index, e.start_char, e.end_char, e.text) for e in r.evidence]
            tokens = sum(len(x) for x in g.tokenizer([s.text for s in spans], add_special_tokens=False)["input_ids"])
            s = score_example(example_id=ex.id, documents=ex.documents, answers=ex.answers, answerable=ex.answerable,
                              gold=ex.gold, units=units, spans=spans, no_evidence=r.no_evidence,
                              evidence_tokens=tokens, document_tokens=1, latency_ms=warm)
            row = rows[b]
            row["hit"].append(bool(s.answer_hit))
            row["f1"].append(s.f1 or 0.0)
            row["tokens"].append(tokens)
            row["skip"].append(r.usage.skip_ms)
            row["warm"].append(warm)
        print(f"{i + 1}/{len(examples)}", file=sys.stderr, flush=True)
    base = rows[max(budgets)]
    for b, row in rows.items():
        gain_f1 = statistics.mean(x - y for x, y in zip(row["f1"], base["f1"], strict=True))
        print(f"{dataset} budget {b}: recall {statistics.mean(row['hit']):.3f}, F1 {statistics.mean(row['f1']):.3f} "
              f"(vs {max(budgets)}: {gain_f1:+.3f}), evidence tokens {statistics.mean(row['tokens']):.1f}, "
              f"skip p50 {statistics.median(row['skip']):.0f} ms, warm p50 {statistics.median(row['warm']):.0f} ms",
              flush=True)


if __name__ == "__main__":
    main()

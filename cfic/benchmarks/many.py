"""``cfic bench --many-documents``: what grounding one question in N candidate documents costs per document.

A question from the HotpotQA evaluation split is grounded in its own document plus N - 1 other questions'
documents (real text, about 1,500 tokens each; the own document at a rotating position), cold: every document
arrives as text, as from an index. Two configurations run interleaved on the same inputs: ``read-all`` (the model
reads every document) and ``read-best`` (the shipped default: the prior ranks the sentences of all documents
together and the model reads only the documents holding the best starts). Reported per N: median milliseconds per
question and per document, the documents the model read, answer hits of each, and how often both returned the
same evidence.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from cfic.benchmarks.common import Evidence, evidence_of
from cfic.files import write_atomic

CONFIGURATIONS = {"read-all": {"read_all_documents": True}, "read-best": {}}


def _inputs(examples: list[Any], count: int, question: int) -> tuple[Any, list[str]]:
    """Question ``question``'s example and its ``count`` documents (its own at a rotating position)."""
    ex = examples[question]
    others = [e.documents[0] for j, e in enumerate(examples) if j != question][: count - 1]
    at = question % count
    return ex, [*others[:at], ex.documents[0], *others[at:]]


def run_many_documents_bench(model: str | None, counts: list[int], n_questions: int, rounds: int,
                             adapter: str | None = "auto") -> dict[str, Any]:
    from cfic.eval.datasets import load_split
    from cfic.eval.metrics import contains_answer
    from cfic.grounder import Grounder

    examples = [e for e in load_split("hotpotqa", "eval") if e.answers][: max(counts) + n_questions]
    if len(examples) < max(counts) + n_questions - 1:
        raise ValueError("not enough HotpotQA examples for these counts")
    base = Grounder.from_pretrained(model, adapter=adapter)
    grounders = {name: Grounder(base.loaded, base.config.with_options(**opts), base.swiftkv,
                                sentence_prior=base.sentence_prior) for name, opts in CONFIGURATIONS.items()}
    rows = []
    for count in counts:
        ms: dict[str, list[float]] = {name: [] for name in grounders}
        read: dict[str, list[int]] = {name: [] for name in grounders}
        hits: dict[str, int] = dict.fromkeys(grounders, 0)
        same = 0
        for q in range(n_questions):
            ex, docs = _inputs(examples, count, q)
            evidence: dict[str, Evidence] = {}
            for _ in range(rounds):
                for name, g in grounders.items():  # interleaved: A, B, A, B
                    t = time.perf_counter()
                    result = g.ground(ex.question, docs, abstain=False)
                    ms[name].append((time.perf_counter() - t) * 1000)
                    read[name].append(result.usage.input_tokens)  # tokens the model read: documents + question
                    evidence[name] = evidence_of(result)
            for name in grounders:
                hits[name] += contains_answer(" ".join(docs[d][a:b] for d, a, b in evidence[name]), ex.answers)
            same += evidence["read-all"] == evidence["read-best"]
        row: dict[str, Any] = {"documents": count, "questions": n_questions}
        for name in grounders:
            med = statistics.median(ms[name])
            row[name] = {"ms": med, "ms_per_document": med / count, "tokens_read": statistics.median(read[name]),
                         "answer_hits": hits[name]}
        row["speedup"] = row["read-all"]["ms"] / row["read-best"]["ms"]
        row["same_evidence"] = same / n_questions
        rows.append(row)
    return {"dataset": "hotpotqa eval (documents of other questions as distractors)", "model": base.model_name,
            "dtype": str(base.loaded.dtype).replace("torch.", ""), "rounds": rounds, "rows": rows}


def print_many_documents_report(report: dict[str, Any]) -> None:
    print(f"\nmany documents per question — {report['dataset']}; {report['model']} {report['dtype']}, median of "
          f"{report['rounds']} interleaved rounds, cold (encode included)")
    print(f"{'N':>3} {'read-all ms':>12} {'per doc':>8} {'read-best ms':>13} {'per doc':>8} {'speedup':>8} "
          f"{'tokens read (all/best)':>24} {'hits (all/best)':>16} {'same':>5}")
    for r in report["rows"]:
        a, b = r["read-all"], r["read-best"]
        tokens = f"{a['tokens_read']:,.0f}/{b['tokens_read']:,.0f}"
        print(f"{r['documents']:>3} {a['ms']:>12,.0f} {a['ms_per_document']:>8,.0f} {b['ms']:>13,.0f} "
              f"{b['ms_per_document']:>8,.0f} {r['speedup']:>7.2f}x {tokens:>24} "
              f"{a['answer_hits']:>7}/{b['answer_hits']:<8} {r['same_evidence']:>5.2f}")


def plot_many_documents(report: dict[str, Any], path: Any) -> None:
    """Milliseconds per document against the document count, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["documents"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in CONFIGURATIONS:
        ax.plot(counts, [r[name]["ms_per_document"] for r in report["rows"]], marker="o", label=name)
    ax.set_xlabel("documents per question")
    ax.set_ylabel("ms per document (cold, median)")
    ax.set_xticks(counts)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']} {report['dtype']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    # the temp file's name ends in .tmp: the format comes from the target's suffix
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)

"""Write an evaluation report: ``report.json`` (the numbers), ``report.md`` (a table people can read),
``recall_vs_tokens.png`` (answer recall against evidence tokens, one point per method) and
``examples.jsonl`` (every method's score on every example, for anyone who wants to check a number)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfic.errors import CficError

PLOT_NAME = "recall_vs_tokens.png"


def _fmt(value: Any, kind: str = "rate") -> str:
    if value is None:
        return "—"
    if kind == "rate":
        return f"{value:.3f}"
    if kind == "x":
        return f"{value:.1f}×"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The methods table (GitHub markdown)."""
    rows = report["methods"]
    with_ne = any("no_evidence_accuracy" in r for r in rows.values())
    head = ["method", "answer recall", "sent. P", "sent. R", "sent. F1", "evidence tokens", "compression",
            "verbatim"]
    if with_ne:
        head.append("no-evidence acc.")
    head += ["p50 ms", "p95 ms", "encode / prefix / skip p50 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in rows.items():
        stages = " / ".join(_fmt(r.get(f"{s}_p50"), "int") for s in ("encode_ms", "prefix_ms", "skip_ms"))
        cells = [f"`{name}`", _fmt(r["answer_recall"]), _fmt(r["sentence_precision"]),
                 _fmt(r["sentence_recall"]), _fmt(r["sentence_f1"]), _fmt(r["evidence_tokens"], "float"),
                 _fmt(r["compression"], "x"), _fmt(r["verbatim_rate"])]
        if with_ne:
            cells.append(_fmt(r.get("no_evidence_accuracy")))
        cells += [_fmt(r["latency_ms_p50"], "int"), _fmt(r["latency_ms_p95"], "int"),
                  stages if any(f"{s}_p50" in r for s in ("encode_ms", "prefix_ms", "skip_ms")) else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    title = f"# cfic evaluate — {report['dataset']}"
    facts = [f"n = {report['n']}", f"seed = {report['seed']}", f"model = `{report['model']}`"]
    if report.get("k"):
        facts.append(f"K = {report['k']} passages per document")
    any_row = next(iter(report["methods"].values()))
    if any_row.get("document_tokens"):
        facts.append(f"mean document = {any_row['document_tokens']:,.0f} tokens")
    parts = [title, "", ", ".join(facts) + ".", ""]
    if report.get("command"):
        parts += ["```", report["command"], "```", ""]
    parts += [markdown_table(report), ""]
    notes = [
        f"Evidence budget for the sentence baselines: {report['budget']}.",
        "Answer recall: a normalised gold answer occurs in the evidence (questions with answers only). "
        "Sentence P/R/F1: evidence vs gold sentences by character overlap, macro-averaged over examples with "
        "gold. Compression: mean document tokens / mean evidence tokens. Verbatim: share of examples whose "
        "every evidence piece is exactly in the document. Latency: wall time per example, per-document work "
        "amortised over the questions sharing the document.",
    ]
    gen = report["methods"].get("generate")
    if gen and gen.get("verbatim_rate") is not None:
        notes.append(f"`generate` output was not verbatim in the document for "
                     f"{100 * (1 - gen['verbatim_rate']):.1f}% of the examples where it produced any "
                     f"({100 * (1 - (gen.get('verbatim_piece_rate') or 0)):.1f}% of its output lines)"
                     + (f"; the document was cut to fit the context in {gen['truncated']} examples"
                        if gen.get("truncated") else "") + ".")
    parts += ["- " + n for n in notes]
    return "\n".join(parts) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    points = [(name, r["evidence_tokens"], r["answer_recall"]) for name, r in report["methods"].items()
              if r.get("evidence_tokens") and r.get("answer_recall") is not None]
    for name, x, y in points:
        ax.scatter([x], [y], s=48, zorder=3, color="C3" if name.startswith("cfic") else "C0")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:,.0f}" if f"{v:.0e}"[0] in "235" else ""))
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("evidence tokens per example (mean, log scale)")
    ax.set_ylabel("answer recall")
    ax.set_title(f"{report['dataset']} (n={report['n']}, {report['model']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict[str, Any], scores: dict[str, Sequence[Any]] | None, out: Path) -> list[Path]:
    """Write the report files into ``out`` (created if needed); return their paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CficError(f"cannot create --out {str(out)!r}: {exc.strerror or exc}") from exc
    paths = [out / "report.json", out / "report.md", out / PLOT_NAME]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown_report(report), encoding="utf-8")
    plot(report, paths[2])
    if scores is not None:
        if "cfic" in scores and len(scores) > 1:
            from cfic.eval.compare import compare, markdown

            rows = {m: [vars(s) for s in items] for m, items in scores.items()}
            with_no_evidence = any(not s.answerable for s in scores["cfic"])
            report["comparisons"] = compare(rows, with_no_evidence=with_no_evidence)
            paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            paths[1].write_text(markdown_report(report) + "\nPaired bootstrap 95% intervals (2,000 resamples) of "
                                "the differences:\n\n" + markdown(report["comparisons"]) + "\n", encoding="utf-8")
        lines = [json.dumps({"method": method, **vars(s)}, ensure_ascii=False)
                 for method, items in scores.items() for s in items]
        (out / "examples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(out / "examples.jsonl")
    return paths

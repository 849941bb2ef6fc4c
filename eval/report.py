"""Write an evaluation report: ``report.json`` (the numbers), ``report.md`` (a table people can read),
``recall_vs_tokens.png`` (answer recall against evidence tokens, one point per method),
``abstention_tradeoff.png`` (datasets with unanswerable questions: what each ``no_evidence`` threshold costs) and
``examples.jsonl`` (every method's score on every example, for anyone who wants to check a number)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError
from cfic.files import write_atomic

PLOT_NAME = "recall_vs_tokens.png"
ABSTENTION_PLOT = "abstention_tradeoff.png"


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
    head += ["p50 ms", "p95 ms", "encode / reading / prefix / skip p50 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in rows.items():
        stages = " / ".join(_fmt(r.get(f"{s}_p50"), "int") for s in ("encode_ms", "reading_ms", "prefix_ms",
                                                                      "skip_ms"))
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
    if report.get("split", "eval") != "eval":
        title += f" ({report['split']} split)"
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
    abstention = report.get("abstention")
    if abstention:
        shipped = abstention["shipped"]
        notes.append(f"Abstention ({abstention['method']}): at the shipped threshold {shipped['threshold']:.3f} "
                     f"(fitted on training questions) no-evidence accuracy {shipped['no_evidence_accuracy']:.3f}, "
                     f"answer recall on answerable questions {shipped['answerable_recall']:.3f}, abstained on "
                     f"{100 * shipped['abstained_on_answerable']:.1f}% of them; every other threshold in "
                     f"`{ABSTENTION_PLOT}`.")
    parts += ["- " + n for n in notes]
    return "\n".join(parts) + "\n"


def abstention_tradeoff(scores: dict[str, Sequence[Any]], threshold: float, method: str = "cfic",
                        steps: int = 50) -> dict[str, Any]:
    """What every ``no_evidence`` threshold would have scored in this run (each example's P(no evidence) and the
    evidence it would have given are recorded): no-evidence accuracy over all questions against answer recall on
    the answerable ones. Read-only: the shipped threshold is fitted on training questions (``cfic
    fit-abstention``); this shows where it lands and what the alternatives cost."""
    rows = [s for s in scores[method] if s.no_evidence_probability is not None]
    if not rows:
        return {}
    p = np.array([s.no_evidence_probability for s in rows])
    unanswerable = np.array([not s.answerable for s in rows])
    hit = np.array([bool(s.answered_hit) for s in rows])

    def point(t: float) -> dict[str, float]:
        abstain = p >= t
        return {"threshold": round(float(t), 4),
                "no_evidence_accuracy": round(float(np.mean(abstain == unanswerable)), 4),
                "answerable_recall": round(float(np.mean(hit[~unanswerable] & ~abstain[~unanswerable])), 4)
                if (~unanswerable).any() else None,
                "abstained_on_answerable": round(float(np.mean(abstain[~unanswerable])), 4)
                if (~unanswerable).any() else None}

    grid = sorted({0.0, 1.01, *np.quantile(p, np.linspace(0, 1, steps)).tolist()})
    baselines = {name: round(float(np.mean([bool(s.answer_hit) for s in items if s.answerable])), 4)
                 for name, items in scores.items() if name != method and any(s.answerable for s in items)}
    return {"method": method, "shipped": point(threshold), "curve": [point(t) for t in grid],
            "baseline_answerable_recall": baselines}


def plot_abstention(report: dict[str, Any], path: Path) -> None:
    """No-evidence accuracy against answerable recall as the threshold moves, the shipped threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report["abstention"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    curve = data["curve"]
    ax.plot([c["answerable_recall"] for c in curve], [c["no_evidence_accuracy"] for c in curve], color="C3",
            label=f"{data['method']}, threshold varied")
    shipped = data["shipped"]
    ax.scatter([shipped["answerable_recall"]], [shipped["no_evidence_accuracy"]], color="C3", s=60, zorder=3,
               label=f"shipped threshold {shipped['threshold']:.3f}")
    for i, (name, recall) in enumerate(sorted(data["baseline_answerable_recall"].items())):
        ax.axvline(recall, color=f"C{i % 3}", ls=":", lw=1, label=f"{name} (never abstains)")
    ax.set_xlabel("answer recall on answerable questions")
    ax.set_ylabel("no-evidence accuracy (all questions)")
    ax.set_title(f"{report['dataset']} (n={report['n']}): abstention trade-off", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


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
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_report(report: dict[str, Any], scores: dict[str, Sequence[Any]] | None, out: Path) -> list[Path]:
    """Write the report files into ``out`` (created if needed); return their paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CficError(f"cannot create --out {str(out)!r}: {exc.strerror or exc}") from exc
    paths = [out / "report.json", out / "report.md", out / PLOT_NAME]
    write_atomic(paths[0], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(paths[1], markdown_report(report))
    plot(report, paths[2])
    if report.get("abstention"):
        paths.append(out / ABSTENTION_PLOT)
        plot_abstention(report, paths[-1])
    if scores is not None:
        if "cfic" in scores and len(scores) > 1:
            from cfic.eval.compare import compare, markdown

            rows = {m: [vars(s) for s in items] for m, items in scores.items()}
            with_no_evidence = any(not s.answerable for s in scores["cfic"])
            report["comparisons"] = compare(rows, with_no_evidence=with_no_evidence)
            write_atomic(paths[0], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            write_atomic(paths[1], markdown_report(report) + "\nPaired bootstrap 95% intervals (2,000 resamples) of "
                                "the differences:\n\n" + markdown(report["comparisons"]) + "\n")
        lines = [json.dumps({"method": method, **vars(s)}, ensure_ascii=False)
                 for method, items in scores.items() for s in items]
        write_atomic(out / "examples.jsonl", "\n".join(lines) + "\n")
        paths.append(out / "examples.jsonl")
    return paths

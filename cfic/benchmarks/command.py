"""``cfic bench``: checks every option before a model loads, runs the chosen parts, writes and prints the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cfic.benchmarks.common import QUESTIONS
from cfic.errors import CficError
from cfic.files import write_atomic

DTYPES = ("float32", "bfloat16", "float16")


def _numbers(text: str, kind: type, option: str, what: str, ok) -> list:
    """A comma list of ``kind`` values, each passing ``ok``; else a CficError naming ``option``."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CficError(f"{option} takes a comma list of {what}, got {text!r}") from None
    if not all(ok(v) for v in values):
        raise CficError(f"{option} takes a comma list of {what}, got {text!r}")
    return values


def bench_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="Model folder (default: packaged SmolLM2).")] = None,
    doc_tokens: Annotated[int, typer.Option("--doc-tokens", min=64, help="Tokens per document.")] = 2500,
    documents: Annotated[int, typer.Option("--documents", min=1, help="Documents per round.")] = 2,
    questions: Annotated[int, typer.Option("--questions", min=1, max=len(QUESTIONS),
                                           help="Warm questions per document.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds.")] = 2,
    dtypes: Annotated[str, typer.Option("--dtypes", help="Comma list of dtypes to compare.")] = "float32,bfloat16",
    load: Annotated[bool, typer.Option("--load/--no-load", help="Also time model loading cold vs cached.")] = True,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON report here.")] = None,
    lm_weights: Annotated[str, typer.Option("--lm-weights", help="Comma list of prior LM weights to time next to "
                                                                 "the shipped one (first dtype).")] = "",
    core: Annotated[bool, typer.Option("--core/--no-core", help="Cold vs warm, dtypes and model load.")] = True,
    accel: Annotated[bool, typer.Option("--accel/--no-accel", help="SwiftKV and layer skipping vs the full "
                                                                    "model.")] = True,
    accel_dtype: Annotated[str | None, typer.Option("--accel-dtype", help="dtype of the acceleration runs "
                                                                          "(default: the device default).")] = None,
    swiftkv: Annotated[list[str] | None, typer.Option("--swiftkv", help="Distilled SwiftKV parameters to include "
                                                                        "(repeatable; the bundled ones are "
                                                                        "always included).")] = None,
    layer_skip: Annotated[int, typer.Option("--layer-skip", min=0, help="Layers SkipDecode skips at the end of "
                                                                        "the budget (0: leave it out).")] = 6,
    recall_examples: Annotated[int, typer.Option("--recall-examples", min=0, help="NQ evaluation examples for "
                                                                                   "answer recall (0: none).")] = 40,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads (default: torch's).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the acceleration table as "
                                                                     "Markdown here.")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="A PEFT LoRA adapter folder to apply.")] = None,
    many_documents: Annotated[str, typer.Option("--many-documents", help="Comma list of document counts: ground "
                                                "questions in that many documents each, reading all of them vs "
                                                "only those holding the best starts (e.g. 1,5,10,20).")] = "",
    many_questions: Annotated[int, typer.Option("--many-questions", min=1, help="Questions per document count "
                                                                                "(--many-documents).")] = 3,
    plot: Annotated[Path | None, typer.Option("--plot", help="With --many-documents: write its cost curve "
                                                             "(PNG) here.")] = None,
    no_adapter: Annotated[bool, typer.Option("--no-adapter", help="Measure the base model, without the bundled CFIC "
                                                                  "adapter (the bundled SwiftKV parameters were "
                                                                  "distilled for it).")] = False,
) -> None:
    """Measure cold vs warm grounding, decoding overhead, dtypes and model load, and the accelerations (SwiftKV,
    AcrossKV, layer skipping) against the full model, and grounding in many documents, side by side."""
    from cfic.config import adapter_choice

    names = [d.strip() for d in dtypes.split(",") if d.strip()]
    if not names or any(d not in DTYPES for d in names):
        raise CficError(f"--dtypes takes float32, bfloat16 and/or float16, got {dtypes!r}")
    if accel_dtype is not None and accel_dtype not in DTYPES:
        raise CficError(f"--accel-dtype takes float32, bfloat16 or float16, got {accel_dtype!r}")
    weights = _numbers(lm_weights, float, "--lm-weights", "numbers >= 0", lambda w: w >= 0)  # also refuses nan
    counts = _numbers(many_documents, int, "--many-documents", "positive integers", lambda c: c >= 1)
    if plot is not None and not counts:
        raise CficError("--plot draws the --many-documents curve; give --many-documents")
    if not core and not accel and not counts:
        raise CficError("--no-core and --no-accel leave nothing to measure (add --many-documents)")
    adapter_arg = adapter_choice(adapter, no_adapter)
    for path in swiftkv or []:
        if not Path(path).is_file():
            raise CficError(f"--swiftkv {path}: no such file")
    if threads:
        import torch

        torch.set_num_threads(threads)
    report: dict[str, Any] = {"command": " ".join(["cfic", *sys.argv[1:]])}
    if core:
        from cfic.benchmarks.core import run_core_bench

        report |= run_core_bench(model, doc_tokens, documents, questions, rounds, names, load, adapter_arg, weights)
    if accel:
        from cfic.benchmarks.accel import run_accel_bench

        report["acceleration"] = run_accel_bench(model, accel_dtype, doc_tokens, documents, questions, rounds,
                                                 list(swiftkv or []), layer_skip, recall_examples, adapter_arg)
    if counts:
        from cfic.benchmarks.many import plot_many_documents, run_many_documents_bench

        report["many_documents"] = run_many_documents_bench(model, counts, many_questions, rounds, adapter_arg)
        if plot is not None:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_many_documents(report["many_documents"], plot)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(report, indent=2))
    if markdown is not None and accel:
        from cfic.benchmarks.accel import accel_markdown

        markdown.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(markdown, f"Command: `{report['command']}`\n\n" + accel_markdown(report["acceleration"]))
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    _print(report, core, accel, bool(counts))


def _print(report: dict[str, Any], core: bool, accel: bool, many: bool) -> None:
    """The measured parts as tables, in the order they ran."""
    if core:
        from cfic.benchmarks.core import print_core_report

        print_core_report(report)
    if accel:
        from cfic.benchmarks.accel import print_accel_report

        print_accel_report(report["acceleration"])
    if many:
        from cfic.benchmarks.many import print_many_documents_report

        print_many_documents_report(report["many_documents"])

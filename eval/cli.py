"""``cfic evaluate``: the lead wires :func:`evaluate_command` into ``cfic.cli``. Module imports stay light."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Annotated

import typer

from cfic.cli_options import AccelerationOptions, with_option_groups

DATASET_HELP = ("nq (default), hotpotqa, hotpotqa-bridge (multi-hop), squad, nq-long, or generic (your --data-file in "
                "the generic schema).")
METHODS_HELP = ("Comma-separated: cfic, cfic-lm-only, cfic-no-skip, cfic-zero-shot, prior, embedding, bm25, generate, "
                "full-document, random (default: all), cfic-accel (cfic with the acceleration options; added "
                "by itself when one is given), and cfic-budget<N>, e.g. cfic-budget96 (cfic with a skip-decoding "
                "budget of N tokens on cfic's own encodings); with an attention ranker also attention (the ranker "
                "alone) and cfic-no-attention (starts by the prior alone); cfic-hop2 (a second hop); "
                "cfic-reading (the paragraph question-likelihood reading on); cfic-query-update (the ranker "
                "reading learned queries, cfic fit-query-heads).")


def _command_line(**options: object) -> str:
    """The command as a user would type it (recorded in the report so a table can be reproduced)."""
    parts = ["cfic", "evaluate"]
    for name, value in options.items():
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


@with_option_groups
def evaluate_command(
    dataset: Annotated[str, typer.Option("--dataset", help=DATASET_HELP)] = "nq",
    data_file: Annotated[str | None, typer.Option(
        "--data-file", help="Your own data: with --dataset generic, rows of question, answers, documents (or "
                            "document), optional id, gold spans and answerable, in .jsonl/.csv/.parquet or a saved "
                            "dataset; with --dataset nq, an nq-open-oracle file.")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="eval (default) or train: the training side, where design choices are decided.")] = "eval",
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate the first N examples.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Gold passage positions and the random baseline.")] = 0,
    methods: Annotated[str | None, typer.Option("--methods", help=METHODS_HELP)] = None,
    out: Annotated[str | None, typer.Option("--out", help="Report folder (default: runs/eval-DATASET).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Local HF folder or .gguf file (default: packaged SmolLM2-135M-Instruct).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Passages per NQ document (default 20).")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="cfic's score threshold (0..1): below it cfic returns no evidence.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted run from --out's journal (same settings) instead of "
                         "starting over.")] = False,
    *,
    accel: AccelerationOptions,  # shown as its options (cfic.cli_options)
) -> None:
    """Measure cfic and every baseline on the same documents; write report.json, report.md and a plot."""
    from cfic.errors import require_positive_int

    if limit is not None:
        require_positive_int("--limit", limit)
    from cfic.eval.report import PLOT_NAME, markdown_table
    from cfic.eval.runner import evaluate

    options, swiftkv = accel.resolve()
    # only options that change something (--layer-skip 0 alone would add a row identical to cfic)
    changes = (swiftkv != "auto" or options.get("swiftkv_layer") or options.get("layer_skip")
               or options.get("ffn_skip") is not None)
    acceleration = {"options": options, "swiftkv": swiftkv} if changes else None
    out = out or f"runs/eval-{dataset}"
    command = _command_line(dataset=dataset, split=None if split == "eval" else split, data_file=data_file,
                            limit=limit, seed=seed, methods=methods,
                            out=out, model=model, k=k, threshold=threshold,
                            **asdict(accel) | {"swiftkv": swiftkv})
    report = evaluate(dataset, split=split, data_file=data_file, limit=limit, seed=seed, methods=methods, out=out,
                      model=model, k=k, threshold=threshold, progress=not quiet, command=command, resume=resume,
                      acceleration=acceleration)
    typer.echo(markdown_table(report))
    typer.echo(f"\nwrote {out}/report.json, {out}/report.md, {out}/{PLOT_NAME} "
               f"({report['n']} examples, {report['wall_seconds']:.0f} s)")

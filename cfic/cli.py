"""The ``cfic`` command line. Commands are thin: they parse, call ``Grounder`` (or a component), and print.

Every user mistake ends as ``error: <one line>`` on stderr and exit code 2 — never a traceback
(set ``CFIC_DEBUG=1`` to see one for an unexpected failure).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import click
import typer

from cfic.cli_options import AccelerationOptions, AnswerOptions, ModelChoice, with_option_groups
from cfic.errors import CficError, DocumentReadError

app = typer.Typer(
    name="cfic",
    help="Chunking-free in-context grounding: verbatim evidence sentences from whole documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def read_document(path: str) -> tuple[str, str]:
    """Return (document id, text) for a path or ``-`` (stdin); bad files raise DocumentReadError."""
    from cfic.text import decode_text, read_text_file

    if path == "-":
        name, text = "<stdin>", decode_text(sys.stdin.buffer.read(), "<stdin>")
    else:
        name, text = path, read_text_file(path)
    if not text.strip():
        raise DocumentReadError(f"{name}: empty or whitespace-only document")
    return name, text


@app.command()
@with_option_groups
def ground(
    files: Annotated[list[str], typer.Argument(help="Document files (UTF-8 text); '-' reads stdin.")],
    query: Annotated[str, typer.Option("--query", "-q", help="The question.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    *,
    answer: AnswerOptions,  # shown as its options (cfic.cli_options), as are the next two
    weights: ModelChoice,
    acceleration: AccelerationOptions,
    no_prior: Annotated[bool, typer.Option(
        "--no-prior", help="Pure-LM prefix search (no sentence prior, no abstention): the paper's method.")] = False,
    no_attention: Annotated[bool, typer.Option(
        "--no-attention", help="Rank start sentences by the sentence prior alone (the attention ranker off; "
                               "better on one long single-topic article, BENCHMARKS.md round 6).")] = False,
    hops: Annotated[int, typer.Option("--hops", min=1, max=2, help="2: a second search with the first evidence "
                                      "in the question (multi-hop questions).")] = 1,
    abstain: Annotated[bool | None, typer.Option(
        "--abstain/--no-abstain", help="Act on the abstention model (default: as the adapter's settings say); "
                                      "P(no evidence) is shown either way.")] = None,
) -> None:
    """Print verbatim evidence for QUERY from FILES."""
    if files.count("-") > 1:
        raise CficError("'-' (stdin) can be given only once")
    accel, swiftkv = acceleration.resolve()
    load = weights.load_options()
    documents = [{"id": name, "text": text} for name, text in map(read_document, files)]
    if not query.strip():
        raise CficError("the query is empty")
    from cfic.grounder import Grounder

    options: dict = load | dict(accel) | answer.span_budget()
    if no_prior:
        options |= {"prior": None, "abstention": None, "attention": None}
    if no_attention:
        options["attention"] = None
    if hops != 1:
        if no_prior:
            raise CficError("--hops 2 ranks by the sentence prior: it excludes --no-prior")
        options["hops"] = hops
    grounder = Grounder.from_pretrained(swiftkv=swiftkv, **options)
    result = grounder.ground(query, documents, top_k=answer.top_k, threshold=answer.threshold, abstain=abstain)
    if json_out:
        from cfic.types import ground_json

        typer.echo(json.dumps(ground_json(result), ensure_ascii=False, indent=2))
        return
    from rich.console import Console

    console = Console()
    if result.no_evidence:
        why = (f"P(no evidence) = {result.no_evidence_probability:.2f}" if result.no_evidence_probability is not None
               and not result.evidence else "nothing passed the threshold")
        console.print(f"[yellow]no evidence[/yellow] ({why})")
    for rank, ev in enumerate(result.evidence, 1):
        console.print(
            f"[bold]{rank}.[/bold] [cyan]{ev.document_id}[/cyan] chars {ev.start_char}-{ev.end_char} "
            f"sentences {ev.sentence_start}-{ev.sentence_end} score {ev.score:.3f}",
            highlight=False,
        )
        console.print(ev.text, markup=False, highlight=False)
        console.print()
    p_none = ("" if result.no_evidence_probability is None
              else f", P(no evidence) {result.no_evidence_probability:.2f}")
    console.print(f"[dim]{result.usage.input_tokens} input tokens, {result.usage.latency_ms:.0f} ms, model "
                  f"{result.model}{p_none}[/dim]")


@app.command()
@with_option_groups
def batch(
    source: Annotated[str, typer.Argument(help="Questions: .jsonl/.json/.csv/.parquet, a save_to_disk folder, or a "
                                               "Hugging Face dataset name (needs network).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output JSONL, one line per question (appended; rerun the "
                                                        "same command to resume).")],
    split: Annotated[str | None, typer.Option("--split", help="Split of a DatasetDict or hub dataset.")] = None,
    index: Annotated[str | None, typer.Option(
        "--index", help="Corpus index folder: rows without 'documents'/'document' get its best --docs documents.")]
    = None,
    docs: Annotated[int, typer.Option("--docs", min=1, help="Documents per question from --index.")] = 5,
    *,
    answer: AnswerOptions,  # shown as its options (cfic.cli_options), as is the next one
    weights: ModelChoice,
    ray: Annotated[bool, typer.Option("--ray", help="Run on a new local Ray instance (pip install 'cfic[ray]').")]
    = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run on an existing Ray cluster, e.g. 'auto' or 'ray://head:10001'.")] = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Model replicas (Ray actors).")] = 1,
    cpus_per_replica: Annotated[float, typer.Option("--cpus-per-replica", min=0.1,
                                                    help="CPUs Ray reserves per replica.")] = 1.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Ground every question of SOURCE; documents per row or from --index. Resumable: finished ids are skipped."""
    from cfic.batch import BatchSettings, rows_from_table, run_batch
    from cfic.eval.tables import load_table

    model_options = weights.load_options() | answer.span_budget()
    table = load_table(source, split=split)
    search = None
    if index is not None:
        from cfic.retrieval.index import CorpusIndex

        corpus = CorpusIndex.open(index)

        def search(question: str) -> list[dict[str, str]]:
            return [{"id": hit.id, "text": hit.text} for hit in corpus.search(question, k=docs)]

    rows = rows_from_table(table, search)
    settings = BatchSettings(top_k=answer.top_k, threshold=answer.threshold, model_options=model_options)
    counts = run_batch(rows, out, settings, ray=ray, ray_address=ray_address, replicas=replicas,
                       cpus_per_replica=cpus_per_replica, progress=not quiet)
    typer.echo(f"{counts['written']} written, {counts['skipped']} already done, {counts['rows']} rows -> {out}")


def _register_components() -> None:
    """Commands that live with their components (their modules import without torch)."""
    from cfic.api.cli import serve_command
    from cfic.benchmarks.command import bench_command
    from cfic.eval.cli import evaluate_command
    from cfic.retrieval.cli import index_app
    from cfic.training.commands import (
        distill_swiftkv_command,
        fit_abstention_command,
        fit_attention_command,
        fit_prior_command,
        fit_query_heads_command,
        train_command,
    )

    app.add_typer(index_app, name="index", help="A faiss index of whole documents: add, search, info, remove.")
    app.command("serve")(serve_command)
    app.command("evaluate")(evaluate_command)
    app.command("bench")(bench_command)
    app.command("train")(train_command)
    app.command("fit-prior")(fit_prior_command)
    app.command("fit-attention")(fit_attention_command)
    app.command("fit-query-heads")(fit_query_heads_command)
    app.command("fit-abstention")(fit_abstention_command)
    app.command("distill-swiftkv")(distill_swiftkv_command)


def _framework_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) for click and for typer's vendored copy of click (typer >= 0.20)."""
    usage: list[type] = [click.ClickException]
    exits: list[type] = [click.exceptions.Exit]
    aborts: list[type] = [click.exceptions.Abort]
    try:
        from typer import exceptions as tex

        usage.append(tex.TyperException)
        exits.append(tex.Exit)
        aborts.append(tex.Abort)
    except (ImportError, AttributeError):
        pass
    return tuple(usage), tuple(exits), tuple(aborts)


def _quiet_libraries() -> None:
    """Our own messages only: no per-tensor progress bars or library warnings on the terminal."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # deprecation notices of transformers/peft (e.g. when an adapter is merged) are for developers, not users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft)(\.|$)")
    logging.getLogger("cfic").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    _register_components()
    _quiet_libraries()
    from cfic.config import bound_kernel_caches

    bound_kernel_caches()
    usage_errors, exits, aborts = _framework_exceptions()
    try:
        rv = app(args=argv, prog_name="cfic", standalone_mode=False)
    except aborts:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except exits as exc:
        sys.exit(exc.exit_code)
    except usage_errors as exc:
        if isinstance(exc, click.BadParameter) or type(exc).__name__ == "BadParameter":
            typer.echo(f"error: {exc.format_message()}", err=True)  # one line, as for our own errors
        elif hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except CficError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: still one line unless debugging
        if os.environ.get("CFIC_DEBUG"):
            raise
        typer.echo(f"error: internal failure: {type(exc).__name__}: {exc} (set CFIC_DEBUG=1 for details)", err=True)
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()

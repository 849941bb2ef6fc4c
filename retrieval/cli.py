"""``cfic index``: build, search and inspect a corpus index from the command line.

Module imports stay light (typer, stdlib): the cfic CLI imports this to list its commands, and ``--help`` must not
load torch or faiss. Errors are raised as ``CficError``; the cfic CLI main prints them as ``error: ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cfic.text import read_text_file

index_app = typer.Typer(
    help="A faiss index of whole documents: find candidate documents in a corpus, then ground in them.",
    no_args_is_help=True,
    add_completion=False,
)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl",)
_SNIPPET = 240
# ``cfic index add`` saves after every this many documents: a kill costs at most one chunk of embedding (a few minutes
# on a CPU), while each save, which rewrites the faiss file, stays rare (20 saves for 100k documents).
COMMIT_EVERY = 5000

IndexOption = Annotated[Path, typer.Option("--index", "-i", help="The index folder.")]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="sentence-transformers folder (default: the one the index was built with)."),
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cpu).")]


def _read_jsonl(path: Path, source: str) -> list[dict[str, Any]]:
    """One document a non-blank line; a line is checked by the rules every document follows
    (:func:`cfic.documents.as_document`), and a line without an id is named ``<source>:<line>``."""
    from cfic.documents import as_document
    from cfic.errors import CficError, DocumentReadError

    docs = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentReadError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DocumentReadError(f"{path}:{lineno}: each line must be an object with a 'text' string")
        try:
            doc = as_document(row, lineno, default_id=lambda text, line: f"{source}:{line}", allow_empty=True)
        except CficError as exc:
            raise DocumentReadError(f"{path}:{lineno}: {exc}") from exc
        docs.append({"id": doc.id, "text": doc.text,
                     "metadata": {**doc.metadata, "source": str(path), "line": lineno}})
    return docs


def collect_documents(paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every input before the index is touched, so a bad file cannot leave a half-done add.

    A folder contributes its .txt/.md/.jsonl files (recursively, hidden ones skipped), each with the id of its path
    relative to the folder; a file given by name gets its file name as id, so re-adding an edited file replaces it.
    Returns (documents, warnings); empty text files are skipped with a warning.
    """
    from cfic.errors import DocumentReadError

    files: list[tuple[Path, str]] = []
    for given in paths:
        if given.is_dir():
            found = sorted(
                p for p in given.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(given).parts)
            )
            if not found:
                raise DocumentReadError(f"{given} has no .txt, .md or .jsonl files")
            files.extend((p, p.relative_to(given).as_posix()) for p in found)
        elif given.exists():
            files.append((given, given.name))
        else:
            raise DocumentReadError(f"{given} does not exist")
    documents: list[dict[str, Any]] = []
    notes: list[str] = []
    origin: dict[str, str] = {}
    for path, source in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            rows = _read_jsonl(path, source)
        else:
            text = read_text_file(path)
            if not text.strip():
                notes.append(f"skipped {path}: empty")
                continue
            rows = [{"id": source, "text": text, "metadata": {"source": str(path), "filename": path.name}}]
        for row in rows:
            where = f"{path}" + (f":{row['metadata']['line']}" if "line" in row["metadata"] else "")
            if row["id"] in origin:
                raise DocumentReadError(f"two inputs have the id {row['id']!r}: {origin[row['id']]} and {where}")
            if not row["text"].strip():
                notes.append(f"skipped {where}: empty text")
                continue
            origin[row["id"]] = where
            documents.append(row)
    return documents, notes


@index_app.command("add")
def add_command(
    files: Annotated[list[Path], typer.Argument(help="Text files (.txt, .md), JSON lines (.jsonl: id, text, "
                                                     "metadata) or folders of them.")],
    index: IndexOption,
    model: ModelOption = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", help="When creating: flat (exact, default) or hnsw (approximate, for large corpora).")] = None,
    device: DeviceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    commit_every: Annotated[int, typer.Option(
        "--commit-every", min=0,
        help="Save after every N documents, so an interrupted add keeps what it saved (0: one save at the end, "
             "all or nothing).")] = COMMIT_EVERY,
    skip_unchanged: Annotated[bool, typer.Option(
        "--skip-unchanged", help="Leave out documents already indexed with the same id, text and metadata "
                                 "(continues an interrupted add without embedding again).")] = False,
) -> None:
    """Add documents (or replace those with the same id); creates the index if the folder has none."""
    from cfic.retrieval.index import CorpusIndex

    documents, notes = collect_documents(files)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    options: dict[str, Any] = {"model": model, "device": device}
    if kind is not None:
        options["kind"] = kind
    with CorpusIndex.open_or_create(index, **options) as corpus:
        try:
            report = corpus.add(documents, progress=not quiet, commit_every=commit_every or None,
                                skip_unchanged=skip_unchanged)
        except BaseException as exc:
            saved = [n for n in getattr(exc, "__notes__", []) if "were saved before this" in n]
            if saved:  # chunks saved before the failure stay in the index
                typer.echo(f"{saved[0]}; run the same command with --skip-unchanged to add only the rest", err=True)
            raise
        total = len(corpus)
    if not quiet:
        skipped = f", {len(report.unchanged)} unchanged" if skip_unchanged else ""
        typer.echo(f"added {len(report.added)}, replaced {len(report.replaced)}{skipped} document(s) "
                   f"({report.passages} passages); {total} document(s) in {index}")


@index_app.command("search")
def search_command(
    index: IndexOption,
    query: Annotated[str, typer.Option("--query", "-q", help="What to look for.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many documents.")] = 5,
    model: ModelOption = None,
    device: DeviceOption = None,
    ef_search: Annotated[int | None, typer.Option("--ef-search", min=1,
                                                  help="HNSW only: wider search, better recall.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The documents whose best passage is most similar to the query."""
    from cfic.retrieval.index import CorpusIndex

    with CorpusIndex.open(index, model=model, device=device) as corpus:
        hits = corpus.search(query, k=k, ef_search=ef_search)
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit.to_dict(), ensure_ascii=False))
        return
    if not hits:
        typer.echo("no documents in the index")
        return
    for rank, hit in enumerate(hits, start=1):
        passage = " ".join(hit.passage.split())
        if len(passage) > _SNIPPET:
            passage = passage[: _SNIPPET - 1] + "…"
        typer.echo(f"{rank}. {hit.score:.4f}  {hit.id}  [best passage: chars {hit.start_char}-{hit.end_char}]")
        typer.echo(f"   {passage}")


@index_app.command("info")
def info_command(
    index: IndexOption,
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
) -> None:
    """What the index holds: documents, vectors, embedding model, kind, size."""
    from cfic.retrieval.index import CorpusIndex

    with CorpusIndex.open(index) as corpus:
        info = corpus.info()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key}: {value}")


@index_app.command("remove")
def remove_command(
    ids: Annotated[list[str], typer.Argument(help="Document ids to remove.")],
    index: IndexOption,
) -> None:
    """Remove documents by id (unknown ids are reported, not an error)."""
    from cfic.retrieval.index import CorpusIndex

    with CorpusIndex.open(index) as corpus:
        removed = corpus.remove(ids)
        total = len(corpus)
    missing = [i for i in dict.fromkeys(ids) if i not in set(removed)]
    typer.echo(f"removed {len(removed)} document(s); {total} left in {index}")
    if missing:
        typer.echo(f"not in the index: {', '.join(missing)}", err=True)


if __name__ == "__main__":  # pragma: no cover
    try:
        index_app()
    except Exception as exc:  # the cfic main does this for the wired-in commands
        from cfic.errors import CficError

        if isinstance(exc, CficError):
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)
        raise

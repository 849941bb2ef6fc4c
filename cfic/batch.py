"""``cfic batch``: ground a whole question set offline, in this process or on Ray, resumably.

Input: rows with a ``question`` (and optional ``id``) from any file or dataset :func:`cfic.eval.tables.load_table`
reads (JSONL, CSV, parquet, a ``save_to_disk`` folder, a hub name when there is network). Each row brings its own
``documents`` (list of str) or ``document`` (str), or the documents come from a corpus index (``--index``: the
index's best ``--docs`` documents for the question).

Output: one JSON line per question, the ``cfic ground --json`` schema plus ``id``. Rows are grouped by their
documents so each document set is encoded once for all of its questions (:meth:`Grounder.ground_batch`); a group's
lines are appended and fsynced as soon as it is done. A restarted job reads the output back, drops a last line cut
short by a kill, and skips every id already written: nothing is lost or written twice.

With ``ray_address`` the groups run on Ray Data (``map_batches`` over one model replica per actor); the driver still
writes the output, so resuming works the same way. Ray is an optional extra (``pip install cfic[ray]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfic.errors import CficError


@dataclass(frozen=True)
class BatchRow:
    """One question to ground. ``documents`` are ``{"id", "text"}`` dicts, as :meth:`Grounder.ground` takes them."""

    id: str
    question: str
    documents: tuple[Mapping[str, str], ...]

    @property
    def group_key(self) -> str:
        """Rows with the same key share their documents (and their encodings)."""
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc["id"].encode() + b"\0" + doc["text"].encode() + b"\1")
        return digest.hexdigest()


@dataclass(frozen=True)
class BatchSettings:
    """How each group is grounded; the model options go to :meth:`Grounder.from_pretrained` (picklable, so a Ray
    actor can build its own replica)."""

    top_k: int = 3
    threshold: float | None = None
    model_options: Mapping[str, Any] = field(default_factory=dict)


def _documents_of(row: Mapping[str, Any], where: str) -> tuple[Mapping[str, str], ...] | None:
    from cfic.eval.tables import row_texts

    texts = row_texts(row, where)
    return None if texts is None else tuple({"id": f"doc{i}", "text": t} for i, t in enumerate(texts))


def rows_from_table(table: Iterable[Mapping[str, Any]], search: Callable[[str], list[Mapping[str, str]]] | None = None
                    ) -> list[BatchRow]:
    """Validate the input rows; documents come from each row, or from ``search(question)`` when the row has none."""
    from cfic.eval.tables import row_id as row_id_of
    from cfic.eval.tables import row_question

    rows: list[BatchRow] = []
    seen: set[str] = set()
    for i, row in enumerate(table):
        where = f"row {i + 1}"
        question = row_question(row, where)
        row_id = row_id_of(row, where, default=str(i))
        if row_id in seen:
            raise CficError(f"{where}: id {row_id!r} appears twice (ids say which rows are done when resuming)")
        seen.add(row_id)
        documents = _documents_of(row, where)
        if documents is None:
            if search is None:
                raise CficError(f"{where}: no 'documents'/'document' and no --index to find them")
            documents = tuple(search(question))
            if not documents:
                raise CficError(f"{where}: the index found no documents (is it empty?)")
        rows.append(BatchRow(row_id, question, documents))
    if not rows:
        raise CficError("the input has no rows")
    return rows


def group_rows(rows: Sequence[BatchRow]) -> list[list[BatchRow]]:
    """Rows grouped by their documents, groups in order of first appearance, rows in input order."""
    groups: dict[str, list[BatchRow]] = {}
    for row in rows:
        groups.setdefault(row.group_key, []).append(row)
    return list(groups.values())


def finished_ids(path: Path) -> set[str]:
    """Ids already written to ``path``; a last line cut short by a kill is removed from the file first."""
    if not path.exists():
        return set()
    if path.is_dir():
        raise CficError(f"--out {str(path)!r} is a directory")
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):  # the partial line of an interrupted write: its group runs again
        with path.open("r+b") as f:
            f.truncate(keep)
    done: set[str] = set()
    for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CficError(f"{path}:{n}: not a cfic batch output line; choose another --out") from exc
    return done


def ground_group(grounder: Any, rows: Sequence[BatchRow], settings: BatchSettings) -> list[dict[str, Any]]:
    """Output records for one group: its documents are encoded once for all its questions."""
    from cfic.types import ground_json

    results = grounder.ground_batch([r.question for r in rows], list(rows[0].documents), top_k=settings.top_k,
                                    threshold=settings.threshold)
    return [{"id": r.id, **ground_json(res)} for r, res in zip(rows, results, strict=True)]


def _append(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _in_process(groups: Sequence[Sequence[BatchRow]], settings: BatchSettings) -> Iterator[list[dict[str, Any]]]:
    from cfic.grounder import Grounder

    grounder = Grounder.from_pretrained(**settings.model_options)
    for group in groups:
        yield ground_group(grounder, group, settings)


class _GroupActor:
    """A Ray Data actor: one model replica, grounding one group per call."""

    def __init__(self, settings_json: str) -> None:
        from cfic.grounder import Grounder

        self.settings = _settings_from_json(settings_json)
        self.grounder = Grounder.from_pretrained(**self.settings.model_options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        lines = []
        for payload in batch["group"]:
            rows = [BatchRow(r["id"], r["question"], tuple(r["documents"])) for r in json.loads(payload)]
            lines.append(json.dumps(ground_group(self.grounder, rows, self.settings), ensure_ascii=False))
        return {"records": lines}


def _settings_to_json(settings: BatchSettings) -> str:
    return json.dumps({"top_k": settings.top_k, "threshold": settings.threshold,
                       "model_options": dict(settings.model_options)})


def _settings_from_json(text: str) -> BatchSettings:
    return BatchSettings(**json.loads(text))


def _on_ray(groups: Sequence[Sequence[BatchRow]], settings: BatchSettings, address: str | None, replicas: int,
            cpus_per_replica: float) -> Iterator[list[dict[str, Any]]]:
    try:
        import ray
    except ImportError as exc:
        raise CficError("--ray needs Ray: pip install 'cfic[ray]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 (Ray raises many kinds; the user needs one line)
            raise CficError(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from exc
    payloads = [{"group": json.dumps([{"id": r.id, "question": r.question, "documents": list(r.documents)}
                                      for r in group], ensure_ascii=False)} for group in groups]
    dataset = ray.data.from_items(payloads, override_num_blocks=max(1, len(payloads)))
    results = dataset.map_batches(_GroupActor, fn_constructor_args=(_settings_to_json(settings),), batch_size=1,
                                  concurrency=replicas, num_cpus=cpus_per_replica, batch_format="numpy")
    for row in results.iter_rows():
        yield json.loads(row["records"])


def run_batch(
    rows: Sequence[BatchRow],
    out: str | Path,
    settings: BatchSettings,
    *,
    ray: bool = False,
    ray_address: str | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    progress: bool = True,
) -> dict[str, int]:
    """Ground every row not yet in ``out``; returns counts (rows, skipped as already done, written, groups run)."""
    from tqdm.auto import tqdm

    path = Path(out)
    done = finished_ids(path)
    todo = [r for r in rows if r.id not in done]
    groups = group_rows(todo)
    if groups:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:
            raise CficError(f"cannot write --out {str(path)!r}: {exc.strerror or exc}") from exc
    source = (_on_ray(groups, settings, ray_address, replicas, cpus_per_replica) if ray or ray_address
              else _in_process(groups, settings))
    written = 0
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc="cfic batch", unit="q", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for records in source if groups else ():
            _append(path, records)
            written += len(records)
            bar.update(len(records))
    return {"rows": len(rows), "skipped": len(rows) - len(todo), "written": written, "groups": len(groups)}

"""The evaluation journal: one JSON line per finished example, so a long ``cfic evaluate`` survives a kill.

A run on 200 NQ documents takes about an hour on two CPU cores, longer than some sessions last. Every example's
scores (all methods) are appended and flushed as soon as the example is done; ``cfic evaluate --resume`` reads
them back and continues with the next example. The first line records the settings that decide the scores
(dataset, seed, methods, ...): resuming with different settings is refused instead of mixing two runs. A line
cut short by a kill is dropped (its example is simply run again), so nothing is lost or counted twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.eval.metrics import ExampleScore
from cfic.files import write_atomic

JOURNAL_NAME = "journal.jsonl"


@dataclass
class JournalEntry:
    """One finished example: every method's score, the ``generate`` truncation flags and its wall time."""

    example_id: str
    scores: dict[str, ExampleScore]
    truncated: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _entry_from_json(row: Mapping[str, Any]) -> JournalEntry:
    return JournalEntry(example_id=row["example_id"],
                        scores={m: ExampleScore(**s) for m, s in row["scores"].items()},
                        truncated=dict(row.get("truncated", {})), seconds=float(row.get("seconds", 0.0)))


def read_journal(path: Path, settings: Mapping[str, Any]) -> list[JournalEntry]:
    """The finished examples of an earlier run with the same ``settings``; [] when there is no journal."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, IndexError) as exc:
        raise CficError(f"{path} is not an evaluation journal; remove it or choose another --out") from exc
    recorded = header.get("settings") if isinstance(header, dict) else None
    if recorded != json.loads(json.dumps(dict(settings))):
        diff = sorted(k for k in set(recorded or {}) | set(settings) if (recorded or {}).get(k) != settings.get(k))
        raise CficError(f"{path} was written with other settings ({', '.join(diff) or 'format'} differ); "
                        "run without --resume to start over, or choose another --out")
    entries = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            entries.append(_entry_from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # the line a kill cut short: that example runs again
    return entries


class JournalWriter:
    """Appends finished examples; ``start`` rewrites the header and the entries kept from an earlier run."""

    def __init__(self, path: Path, settings: Mapping[str, Any]) -> None:
        self.path = path
        self.settings = dict(settings)

    def start(self, kept: list[JournalEntry]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CficError(f"cannot create {str(self.path.parent)!r}: {exc.strerror or exc}") from exc
        lines = [json.dumps({"settings": self.settings})] + [self._line(e) for e in kept]
        write_atomic(self.path, "\n".join(lines) + "\n")  # a kill during the rewrite leaves the old journal intact

    def append(self, entry: JournalEntry) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(self._line(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _line(entry: JournalEntry) -> str:
        return json.dumps({"example_id": entry.example_id, "seconds": round(entry.seconds, 3),
                           "truncated": entry.truncated,
                           "scores": {m: vars(s) for m, s in entry.scores.items()}}, ensure_ascii=False)

"""Paired bootstrap intervals of cfic's differences to every other method of one run.

Every method answered the same examples in the same run, so differences are paired per example: resample the
examples (with replacement, seeded), recompute each mean difference, and take the 2.5th and 97.5th percentiles.
``python -m cfic.eval.compare RUN_FOLDER`` prints them for a finished run's ``examples.jsonl``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError

METRICS = {"answer_recall": "answer_hit", "sentence_f1": "f1", "no_evidence_accuracy": None}
RESAMPLES = 2000


def _values(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float | None]:
    if metric == "no_evidence_accuracy":
        return [float(r["no_evidence"] == (not r["answerable"])) for r in rows]
    field = METRICS[metric]
    return [None if r.get(field) is None else float(r[field]) for r in rows]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                     strata: Sequence[str] | None = None) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the 95% paired bootstrap interval of the mean difference.

    With ``strata`` the statistic is the mean over strata of each stratum's mean difference (every source counts
    once, however many examples it has), and examples are resampled within their stratum."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        raise CficError("no paired examples to compare")
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [d]
    else:
        labels = np.asarray(strata)
        if labels.shape != d.shape:
            raise CficError("strata must label every paired example")
        groups = [d[labels == s] for s in sorted(set(labels.tolist()))]
    point = float(np.mean([g.mean() for g in groups]))
    means = np.mean([g[rng.integers(0, g.size, size=(resamples, g.size))].mean(axis=1) for g in groups], axis=0)
    return point, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(rows_by_method: Mapping[str, Sequence[Mapping[str, Any]]], reference: str = "cfic",
            with_no_evidence: bool = False) -> dict[str, dict[str, dict[str, float | int]]]:
    """{other method: {metric: {diff, low, high, n}}} of ``reference`` minus each other method, on the examples
    where both have the metric."""
    if reference not in rows_by_method:
        raise CficError(f"method {reference!r} is not in the run")
    ref = {r["example_id"]: r for r in rows_by_method[reference]}
    metrics = [m for m in METRICS if with_no_evidence or m != "no_evidence_accuracy"]
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for method, rows in rows_by_method.items():
        if method == reference:
            continue
        pairs = [(ref[r["example_id"]], r) for r in rows if r["example_id"] in ref]
        out[method] = {}
        for metric in metrics:
            a = _values([p[0] for p in pairs], metric)
            b = _values([p[1] for p in pairs], metric)
            kept = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
            if not kept:
                continue
            diff, low, high = paired_bootstrap([x for x, _ in kept], [y for _, y in kept])
            out[method][metric] = {"diff": round(diff, 4), "low": round(low, 4), "high": round(high, 4),
                                   "n": len(kept)}
    return out


def read_examples(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    path = Path(folder) / "examples.jsonl"
    if not path.is_file():
        raise CficError(f"{path} does not exist (run cfic evaluate --out {folder} first)")
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["method"], []).append(row)
    return rows


def markdown(comparison: Mapping[str, Mapping[str, Mapping[str, float | int]]], reference: str = "cfic") -> str:
    lines = []
    for method, metrics in comparison.items():
        parts = [f"{metric.replace('_', ' ')} {v['diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                 for metric, v in metrics.items()]
        lines.append(f"- `{reference}` − `{method}`: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cfic.eval.compare RUN_FOLDER", file=sys.stderr)
        return 2
    try:
        rows = read_examples(args[0])
        with_no_evidence = any(not r["answerable"] for r in rows.get("cfic", []))
        print(markdown(compare(rows, with_no_evidence=with_no_evidence)))
    except CficError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-score one ``cfic evaluate`` run on the examples of a sub-dataset (``python -m cfic.eval.subset``).

Why: HotpotQA's bridge questions (``hotpotqa-bridge``, the multi-hop set) are 164 of the 199 bundled HotpotQA
evaluation questions. Evaluating them again would repeat the same model work; instead the per-example rows of the
HotpotQA run (``examples.jsonl``) are restricted to the bridge questions and compared with the same paired bootstrap,
so the multi-hop figures come from the very run that gives the whole-set figures.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cfic.errors import CficError

METRICS = ("answer_hit", "f1")


def subset_scores(run: str | Path, dataset: str, split: str = "eval", reference: str = "cfic") -> dict[str, Any]:
    """Per method: mean answer recall and sentence F1 over the run's examples that belong to ``dataset``'s
    ``split``; and ``reference`` minus each other method, paired bootstrap 95% (examples scored by both)."""
    from cfic.eval import load_split
    from cfic.eval.compare import paired_bootstrap

    path = Path(run) / "examples.jsonl"
    if not path.is_file():
        raise CficError(f"{path} does not exist (pass the --out folder of a cfic evaluate run)")
    ids = {ex.id for ex in load_split(dataset, split)}
    rows: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["example_id"] in ids:
                rows[row["method"]][row["example_id"]] = row
    if reference not in rows:
        raise CficError(f"the run has no {reference!r} rows on {dataset} {split}")
    out: dict[str, Any] = {"dataset": dataset, "split": split, "run": str(run), "methods": {}, "comparisons": {}}
    for method, by_id in rows.items():
        out["methods"][method] = {"n": len(by_id), **{
            m: float(np.mean([r[m] for r in by_id.values() if r[m] is not None])) for m in METRICS
            if any(r[m] is not None for r in by_id.values())}}
    ref = rows[reference]
    for method, by_id in rows.items():
        if method == reference:
            continue
        out["comparisons"][method] = {}
        for m in METRICS:
            both = [i for i in ref if i in by_id and ref[i][m] is not None and by_id[i][m] is not None]
            if both:
                diff, low, high = paired_bootstrap([float(ref[i][m]) for i in both], [float(by_id[i][m]) for i in both])
                out["comparisons"][method][m] = {"diff": diff, "low": low, "high": high, "n": len(both)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfic.eval.subset", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the --out folder of a cfic evaluate run")
    parser.add_argument("--dataset", default="hotpotqa-bridge")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--reference", default="cfic")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    try:
        result = subset_scores(args.run, args.dataset, args.split, args.reference)
    except CficError as exc:
        parser.exit(2, f"error: {exc}\n")
    text = json.dumps(result, indent=2)
    if args.out:
        from cfic.files import write_atomic

        write_atomic(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

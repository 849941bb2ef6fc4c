"""cfic.eval: measure cfic against the baselines people would use instead, on the same documents.

``evaluate(...)`` runs it (``cfic evaluate`` on the command line); ``load_split(dataset, split)`` gives the
bundled examples, including the NQ and HotpotQA training sides that never overlap the evaluation split.
Heavy modules are imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATASETS", "METHOD_NAMES", "Example", "evaluate", "load_split"]


def __getattr__(name: str) -> Any:
    if name in ("DATASETS", "Example", "load_split"):
        from cfic.eval import datasets

        return getattr(datasets, name)
    if name == "METHOD_NAMES":
        from cfic.eval.methods import METHOD_NAMES

        return METHOD_NAMES
    if name == "evaluate":
        from cfic.eval.runner import evaluate

        return evaluate
    raise AttributeError(f"module 'cfic.eval' has no attribute {name!r}")

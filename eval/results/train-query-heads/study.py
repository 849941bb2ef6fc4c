"""Training-side feasibility study (issue 29, round 11): can a learned change of the question pass's queries make
the attention ranker beat the prior on NQ? The material and the training are the product's
(:mod:`cfic.training.query_heads`, ``cfic fit-query-heads``); this script only cross-validates other settings on
the same material (``runs/query-heads``, collected by ``cfic fit-query-heads`` or ``collect`` here).

    .venv/bin/python eval/results/train-query-heads/study.py collect            # NQ train 460-859, HotpotQA 0-99
    .venv/bin/python eval/results/train-query-heads/study.py cv 6               # epochs -> prints the held-out table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[3]
MATERIAL = ROOT / "runs" / "query-heads"


def main() -> None:
    from cfic import Grounder
    from cfic.training import query_heads as qh

    grounder = Grounder.from_pretrained()
    ranker = grounder.config.attention.with_query_update((), None, None)
    if sys.argv[1] == "collect":
        from cfic.eval import load_split

        examples = [("nq", ex) for ex in load_split("nq", "train")[qh.NQ_OFFSET: qh.NQ_OFFSET + 400]]
        examples += [("hotpotqa", ex) for ex in load_split("hotpotqa", "train")[:100]]
        print(f"skipped {qh.collect(grounder, examples, MATERIAL)} multi-window documents")
    else:
        epochs = int(sys.argv[2])
        items = qh.load_items(MATERIAL)
        print(f"{len(items)} questions; layers {qh.LAYERS}, rank {qh.RANK}, 4 folds, {epochs} epochs")
        print(json.dumps(qh.cross_validate(items, ranker, 4, epochs, 3e-3, 1e-3), indent=1))


if __name__ == "__main__":
    main()

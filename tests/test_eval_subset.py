"""Re-scoring a run on a sub-dataset: the multi-hop figures come from the whole-set run's own rows."""

from __future__ import annotations

import json

import pytest

from cfic.errors import CficError
from cfic.eval import load_split
from cfic.eval.subset import main, subset_scores


def test_bridge_subset_keeps_only_bridge_questions_and_pairs_them(tmp_path, capsys):
    bridge = {ex.id for ex in load_split("hotpotqa-bridge", "eval")}
    everything = load_split("hotpotqa", "eval")
    assert 0 < len(bridge) < len(everything) and bridge <= {ex.id for ex in everything}
    rows = []
    for i, ex in enumerate(everything):
        inside = ex.id in bridge
        # cfic finds every bridge answer and no other; the baseline the other way round
        rows.append({"method": "cfic", "example_id": ex.id, "answer_hit": inside, "f1": 0.5})
        rows.append({"method": "bm25", "example_id": ex.id, "answer_hit": not inside, "f1": 0.25 if i % 2 else None})
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subset_scores(tmp_path, "hotpotqa-bridge")
    assert out["methods"]["cfic"] == {"n": len(bridge), "answer_hit": 1.0, "f1": 0.5}
    assert out["methods"]["bm25"]["answer_hit"] == 0.0
    diff = out["comparisons"]["bm25"]["answer_hit"]
    assert diff["diff"] == 1.0 and diff["n"] == len(bridge)
    assert out["comparisons"]["bm25"]["f1"]["n"] < len(bridge)  # examples without an F1 are not paired
    assert main([str(tmp_path), "--out", str(tmp_path / "bridge.json")]) == 0
    assert json.loads((tmp_path / "bridge.json").read_text()) == json.loads(capsys.readouterr().out)
    with pytest.raises(CficError):
        subset_scores(tmp_path / "nothing", "hotpotqa-bridge")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--reference", "generate"])
    assert exc.value.code == 2

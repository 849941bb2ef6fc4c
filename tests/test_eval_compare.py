"""Paired bootstrap comparisons written into every evaluation report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfic.errors import CficError
from cfic.eval.compare import compare, main, paired_bootstrap


def test_paired_bootstrap_interval_holds_the_difference_and_shrinks_with_n():
    assert paired_bootstrap([1, 1, 1], [0, 0, 0]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        a = rng.random(n) < 0.7
        b = rng.random(n) < 0.5
        diff, low, high = paired_bootstrap(a, b)
        assert low <= diff <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_compare_pairs_by_example_and_scores_abstention(tmp_path):
    def row(method, i, hit, f1, no_ev, answerable=True):
        return {"method": method, "example_id": f"q{i}", "answer_hit": hit, "f1": f1, "no_evidence": no_ev,
                "answerable": answerable}

    rows = [row("cfic", i, True, 0.5, i >= 8, answerable=i < 8) for i in range(10)]
    rows += [row("embedding", i, i % 2 == 0, 0.25, False, answerable=i < 8) for i in range(10)]
    got = compare({m: [r for r in rows if r["method"] == m] for m in ("cfic", "embedding")}, with_no_evidence=True)
    emb = got["embedding"]
    assert emb["answer_recall"]["diff"] == pytest.approx(0.5) and emb["answer_recall"]["n"] == 10
    assert emb["sentence_f1"]["diff"] == pytest.approx(0.25)
    assert emb["no_evidence_accuracy"]["diff"] == pytest.approx(0.2)  # cfic abstained right on both unanswerable
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path / "missing")]) == 2


def test_stratified_bootstrap_weighs_every_stratum_once():
    # stratum x: 4 examples all +1; stratum y: 1 example 0 -> unstratified mean 0.8, stratified 0.5
    a, b, strata = [1, 1, 1, 1, 0], [0, 0, 0, 0, 0], ["x", "x", "x", "x", "y"]
    assert paired_bootstrap(a, b)[0] == pytest.approx(0.8)
    assert paired_bootstrap(a, b, strata=strata) == (0.5, 0.5, 0.5)
    with pytest.raises(CficError, match="strata"):
        paired_bootstrap(a, b, strata=["x"])

"""The real default model (packaged SmolLM2-135M-Instruct) on real Natural Questions passages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "nq_sample.jsonl"
pytestmark = pytest.mark.integration


def nq_document(i: int) -> tuple[dict, str]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    ex = rows[i]
    passages = [f"Title: {r['ctx_title']}\n{r['ctx']}" for j, r in enumerate(rows) if j != i][:6]
    passages.insert(3, f"Title: {ex['title']}\n{ex['long_answer']}")
    return ex, "\n\n".join(passages)


def test_default_model_grounds_a_real_nq_document(default_grounder):
    ex, text = nq_document(0)
    result = default_grounder.ground(ex["question"], [text], top_k=3)
    assert result.evidence and not result.no_evidence
    for ev in result.evidence:
        assert ev.text == text[ev.start_char:ev.end_char]
        assert ev.text.strip() == ev.text
    # The shipped CFIC adapter is merged by default, with the prior and abstention settings fitted with it.
    assert result.model == "smollm2-135m-instruct+cfic-lora"
    from cfic.models import bundled_adapter
    from cfic.prior import Abstention, PriorWeights

    fitted = json.loads((bundled_adapter() / "cfic.json").read_text())
    assert default_grounder.config.prior == PriorWeights.from_dict(fitted["prior"]["weights"])
    assert default_grounder.config.abstention == Abstention.from_dict(fitted["abstention"], folder=bundled_adapter())
    p_none = result.no_evidence_probability
    assert p_none is not None and not default_grounder.config.abstention.abstains(p_none)  # it would answer


def test_the_demo_question_finds_its_answer(default_grounder):
    """``make demo``: the Normans article answers "When did the Normans conquer England?" with 1066 -- in the best
    span, not somewhere in the list."""
    text = (Path(__file__).parents[1] / "cfic" / "data" / "example.txt").read_text(encoding="utf-8")
    result = default_grounder.ground("When did the Normans conquer England?", [text])
    assert result.evidence and "1066" in result.evidence[0].text, [ev.text[:80] for ev in result.evidence]


def test_cli_json_end_to_end(tmp_path):
    ex, text = nq_document(2)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "cfic.cli", "ground", "--json", "--query", ex["question"], str(path)],
                         capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    out = json.loads(res.stdout)
    assert set(out) >= {"query", "model", "evidence", "no_evidence", "usage"}
    assert set(out["usage"]) >= {"input_tokens", "latency_ms"}
    assert out["evidence"]
    for ev in out["evidence"]:
        assert ev["text"] == text[ev["start_char"]:ev["end_char"]]

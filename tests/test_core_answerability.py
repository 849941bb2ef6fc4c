"""The answerability probe: the tapped question state, the probe file, abstention with it, and its fitting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_core_decoding import DOC, QUERY, encoded, window_prompt

from cfic.answerability import PROBE_FILE, AnswerabilityProbe
from cfic.decoding.encode import encode_question, question_pass
from cfic.errors import CficError, ModelLoadError
from cfic.grounder import Grounder
from cfic.models import adapter_settings
from cfic.prior import PROBE_FEATURE, Abstention
from cfic.training.fit_abstention import (
    auc,
    choose_threshold,
    false_abstention,
    fold_of,
    out_of_fold,
    without_evidence,
)

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def setup(tiny_grounder):
    return encoded(tiny_grounder)


def constant_probe(hidden: int, logit: float, layer: int = 1) -> AnswerabilityProbe:
    return AnswerabilityProbe(layer, np.zeros(hidden, np.float32), np.ones(hidden, np.float32),
                              np.zeros(hidden, np.float32), logit)


def test_the_tapped_state_is_the_models_hidden_state_after_that_layer(setup):
    g, enc, window, q_ids = setup
    prompt = window_prompt(g, enc, window) + q_ids
    with torch.inference_mode():
        ref = g.loaded.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
        tapped = question_pass(g.runner, window, q_ids, 8, tap_layer=1)
        plain_cache, plain_first = encode_question(g.runner, window, q_ids, 8)
    torch.testing.assert_close(tapped.tapped, ref[1][0, -1].float(), atol=1e-4, rtol=1e-4)
    # splitting the pass at the tap changes nothing downstream: same first-token distribution, same cache
    torch.testing.assert_close(tapped.first, plain_first, atol=1e-5, rtol=0)
    assert tapped.cache.length == plain_cache.length
    torch.testing.assert_close(tapped.cache.keys[-1][:, :, :plain_cache.length],
                               plain_cache.keys[-1][:, :, :plain_cache.length])


def test_probe_file_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    probe = AnswerabilityProbe(3, rng.normal(size=8).astype(np.float32), np.abs(rng.normal(size=8)).astype(
        np.float32) + 0.1, rng.normal(size=8).astype(np.float32), -0.25)
    probe.save(tmp_path / PROBE_FILE)
    loaded = AnswerabilityProbe.load(tmp_path / PROBE_FILE)
    assert loaded == probe and loaded.layer == 3
    h = rng.normal(size=8).astype(np.float32)
    expected = float(((h - probe.mean) / probe.scale) @ probe.coef - 0.25)
    assert loaded.logit(torch.from_numpy(h)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CficError, match="hidden state of size 8"):
        loaded.logit(np.zeros(5))
    with pytest.raises(CficError, match="not found"):
        AnswerabilityProbe.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CficError, match="unreadable"):
        AnswerabilityProbe.load(tmp_path / "bad.safetensors")
    with pytest.raises(CficError):
        AnswerabilityProbe(1, np.zeros(4), np.zeros(4), np.zeros(4), 0.0)  # a zero scale


def test_grounder_abstains_by_the_probe_even_without_a_prior(tiny_loaded):
    hidden = tiny_loaded.model.config.hidden_size
    for logit, expect_none in ((40.0, True), (-40.0, False)):
        abstention = Abstention((1.0,), 0.0, 0.5, (PROBE_FEATURE,), constant_probe(hidden, logit))
        g = Grounder(tiny_loaded, Grounder(tiny_loaded).config.with_options(abstention=abstention))
        r = g.ground(QUERY, [DOC])
        assert r.no_evidence is expect_none and bool(r.evidence) is not expect_none
        assert r.no_evidence_probability == pytest.approx(1.0 if expect_none else 0.0, abs=1e-9)
        kept = g.ground(QUERY, [DOC], abstain=False)  # the decision is reported, not acted on
        assert kept.evidence and not kept.no_evidence
        assert kept.no_evidence_probability == pytest.approx(r.no_evidence_probability, abs=1e-9)


def test_the_probe_reads_the_state_of_the_most_answerable_window(tiny_loaded):
    """Two documents: the question-level logit is the smallest over windows, so one answerable document is enough."""
    hidden = tiny_loaded.model.config.hidden_size
    g0 = Grounder(tiny_loaded)
    encs = g0.encode([DOC, "Cats sleep most of the day. They purr when content."])
    q_ids = g0.template.query_ids(g0.tokenizer, QUERY, g0.config.max_query_tokens)
    with torch.inference_mode():
        states = [question_pass(g0.runner, e.windows[0], q_ids, 8, tap_layer=2).tapped for e in encs]
    direction = (states[0] - states[1]).numpy()
    direction = direction * 4.0 / float(direction @ direction)  # the two states' logits differ by 4
    middle = float((states[0] + states[1]).numpy() @ direction) / 2
    probe = AnswerabilityProbe(2, np.zeros(hidden, np.float32), np.ones(hidden, np.float32),
                               direction.astype(np.float32), -middle)
    logits = [probe.logit(s) for s in states]
    assert logits == pytest.approx([2.0, -2.0], abs=1e-3)
    abstention = Abstention((1.0,), 0.0, 0.5, (PROBE_FEATURE,), probe)
    g = Grounder(tiny_loaded, g0.config.with_options(abstention=abstention))
    expected = 1 / (1 + np.exp(-min(logits)))
    assert g.ground(QUERY, encs).no_evidence_probability == pytest.approx(expected, rel=1e-4)


def test_adapter_settings_load_the_probe_named_in_cfic_json(tmp_path):
    probe = constant_probe(16, 0.5, layer=2)
    probe.save(tmp_path / PROBE_FILE)
    abstention = Abstention((1.0,), 0.0, 0.7, (PROBE_FEATURE,), probe)
    (tmp_path / "cfic.json").write_text(json.dumps({"abstention": abstention.to_dict()}))
    got = adapter_settings(tmp_path)["abstention"]
    assert got == abstention and got.probe_layer == 2 and not got.needs_signals
    (tmp_path / PROBE_FILE).unlink()
    with pytest.raises(ModelLoadError, match="not found"):
        adapter_settings(tmp_path)
    with pytest.raises(CficError, match="come together"):
        Abstention((1.0,), 0.0, 0.5, (PROBE_FEATURE,), None)
    with pytest.raises(CficError, match="unknown abstention feature"):
        Abstention((1.0,), 0.0, 0.5, ("made_up",))


def test_removing_the_evidence_keeps_only_passages_without_gold_or_answer():
    doc = "Title: A\nParis is in France.\n\nTitle: B\nThe Seine flows there.\n\nTitle: C\nRome is in Italy."
    gold = [(0, doc.index("Paris"), doc.index("France.") + 7)]
    assert without_evidence(doc, gold, ["France"]) == "Title: B\nThe Seine flows there.\n\nTitle: C\nRome is in Italy."
    assert without_evidence(doc, gold, ["Italy"]) == "Title: B\nThe Seine flows there."  # the answer goes too
    assert without_evidence(doc, [], ["Berlin"]) is None  # nothing removed: no clean negative
    assert without_evidence(doc, gold, ["flows"]) == "Title: C\nRome is in Italy."


def test_cross_validated_probe_separates_a_planted_direction_and_the_threshold_balances_sources():
    rng = np.random.default_rng(1)
    n, dim = 240, 32
    y = (rng.random(n) < 0.5).astype(float)
    x = rng.normal(size=(n, dim))
    x[:, 5] += 2.5 * y  # the planted answerability direction
    groups = [f"g{i // 2}" for i in range(n)]
    folds = fold_of(groups)
    assert all(len(set(folds[i: i + 2])) == 1 for i in range(0, n, 2))  # a group stays in one fold
    logits = out_of_fold(x, y, folds, l2=0.15)
    assert auc(logits, y) > 0.9
    assert auc(rng.normal(size=n), y) < 0.7
    sources = np.array(["a"] * 200 + ["b"] * 40)
    probs = 1 / (1 + np.exp(-logits))
    t, acc = choose_threshold(probs, y, sources)
    assert set(acc) == {"a", "b"} and min(acc.values()) > 0.75
    assert 0.0 < t < 1.0


def test_false_abstention_cap_keeps_answerable_questions_answered():
    rng = np.random.default_rng(2)
    n = 400
    y = (rng.random(n) < 0.5).astype(float)
    probs = 1 / (1 + np.exp(-(1.2 * y - 0.6 + rng.normal(size=n))))  # an overlapping, weak probe
    sources = np.array(["a", "b"] * (n // 2))
    free, _ = choose_threshold(probs, y, sources)
    capped, _ = choose_threshold(probs, y, sources, max_false_abstention=0.05)
    assert false_abstention(probs, y, sources, capped) <= 0.05
    assert false_abstention(probs, y, sources, free) > 0.05  # the cap binds on this probe
    assert capped > free
    never, _ = choose_threshold(probs, y, sources, max_false_abstention=0.0)
    assert false_abstention(probs, y, sources, never) == 0.0


def test_an_abstention_model_shipped_disabled_reports_but_does_not_act_unless_asked(tiny_loaded, tmp_path):
    hidden = tiny_loaded.model.config.hidden_size
    off = Abstention((1.0,), 0.0, 0.5, (PROBE_FEATURE,), constant_probe(hidden, 40.0), enabled=False)
    g = Grounder(tiny_loaded, Grounder(tiny_loaded).config.with_options(abstention=off))
    r = g.ground(QUERY, [DOC])
    assert r.evidence and not r.no_evidence and r.no_evidence_probability == pytest.approx(1.0)
    forced = g.ground(QUERY, [DOC], abstain=True)
    assert forced.no_evidence and not forced.evidence
    off.probe.save(tmp_path / PROBE_FILE)
    data = off.to_dict()
    assert data["enabled"] is False and Abstention.from_dict(data, folder=tmp_path) == off
    with pytest.raises(CficError, match="enabled"):
        Abstention.from_dict({**data, "enabled": "no"}, folder=tmp_path)


def test_article_folds_hold_each_squad_article_out_whole():
    from cfic.training.fit_abstention import ProbeItem, article_folds

    items = [ProbeItem("squad", f"squad:{a}", f"q{a}{i}", ("d",), f"squad:{a}", i % 2 == 0)
             for a in ("A", "B") for i in range(6)]
    items += [ProbeItem("nq", f"n{i // 2}", f"n{i}", ("d",), f"n{i // 2}", i % 2 == 1) for i in range(20)]
    folds = article_folds(items)
    squad = {a: {int(f) for f, i in zip(folds, items, strict=True) if i.group == f"squad:{a}"}
             for a in ("A", "B")}
    assert all(len(v) == 1 for v in squad.values()) and squad["A"] != squad["B"]
    nq = [int(f) for f, i in zip(folds, items, strict=True) if i.source == "nq"]
    assert set(nq) == {0, 1} and all(nq[k] == nq[k + 1] for k in range(0, 20, 2))  # pairs stay together


def test_a_feature_model_is_scored_out_of_fold():
    def stacked_out_of_fold(x, y, folds, l2):
        return 1 / (1 + np.exp(-out_of_fold(x, y, folds, l2)))

    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.5).astype(float)
    x = np.stack([y + rng.normal(scale=0.7, size=n), rng.normal(size=n)], axis=1)
    folds = np.arange(n) % 2
    p = stacked_out_of_fold(x, y, folds, 0.1)
    assert auc(p, y) > 0.8 and ((p > 0) & (p < 1)).all()
    noise = stacked_out_of_fold(rng.normal(size=(n, 2)), y, folds, 0.1)
    assert auc(noise, y) < 0.62  # out of fold, pure noise does not look separable


def test_abstention_material_is_what_the_question_pass_computes(setup):
    """The fit's material must be the features the grounder sees: the tapped state and the first-position end
    probability of :func:`question_pass` on the same window."""
    from cfic.decoding.prefix import end_probability
    from cfic.training.abstention_data import window_material

    g, enc, window, q_ids = setup
    layers = [1, 2]
    states, feats = window_material(g, enc, window, q_ids, layers, None)
    with torch.inference_mode():
        for j, layer in enumerate(layers):
            qp = question_pass(g.runner, window, q_ids, 1, tap_layer=layer)
            np.testing.assert_allclose(states[j], qp.tapped.numpy(), atol=1e-4, rtol=1e-4)
    p_end = end_probability(qp.first, g.template.eos_ids)
    assert feats[0] == pytest.approx(np.log(max(p_end, 1e-9)), abs=1e-4)

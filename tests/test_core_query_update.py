"""The attention ranker's learned query update: what it changes (only the attention the tap records), how it
travels with the ranker, and the training that fits it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfic.attention import AttentionRanker
from cfic.config import GroundingConfig
from cfic.decoding.encode import question_pass
from cfic.errors import CficError
from cfic.eval.generic import Example
from cfic.grounder import Grounder
from cfic.prior import PriorWeights

DOC = ("The Normans came from Normandy. They conquered England in 1066. "
       "Rollo was their first ruler. The Rhine flows north.")
QUESTION = "When did the Normans conquer England?"


def test_the_update_travels_with_the_ranker_file_and_is_checked(tmp_path):
    w = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    base = AttentionRanker(w, 0.5, 2.0, fusion_power=-1.0)
    a = np.random.default_rng(1).normal(size=(2, 3, 8, 2)).astype(np.float32)
    b = np.random.default_rng(2).normal(size=(2, 3, 2, 8)).astype(np.float32)
    ranker = base.with_query_update((1, 3), a, b)
    ranker.save(tmp_path / "r.safetensors")
    loaded = AttentionRanker.load(tmp_path / "r.safetensors")
    assert loaded == ranker and loaded != base and loaded.query_layers == (1, 3)
    np.testing.assert_array_equal(loaded.query_update.a.numpy(), a)
    base.save(tmp_path / "plain.safetensors")
    assert AttentionRanker.load(tmp_path / "plain.safetensors").query_update is None
    assert ranker.with_fusion(3.0).query_layers == (1, 3)  # a refit of the fusion keeps the update
    for bad in (((1,), a, b), ((1, 9), a, b), ((1, 3), a, None), ((1, 3), a[:, :2], b[:, :2]),
                ((1, 3), a, b[..., :4]), ((1, 1), a, b)):
        with pytest.raises(CficError):
            base.with_query_update(*bad)


def test_training_on_collected_material_reproduces_the_search_and_raises_the_answers_mass(tiny_loaded, tmp_path):
    """The training's scores with no update are the grounder's own fused scores (from the same material), and a
    few epochs on one question move mass onto its answer sentence."""
    from cfic.training import query_heads as qh

    ranker = AttentionRanker(np.random.default_rng(0).normal(
        size=(2, 2, tiny_loaded.model.config.num_attention_heads)).astype(np.float32), 0.0, 8.0)
    # a weak prior, so the attention decides and the answer does not start with all the mass
    grounder = Grounder(tiny_loaded, GroundingConfig(prior=PriorWeights(0.1, 0.1, 0.1, 0.0), attention=ranker))
    examples = [("nq", Example("q0", QUESTION, ("1066",), (DOC,), ())),
                ("nq", Example("q1", "Who was the first ruler?", ("Rollo",), (DOC,), ()))]
    assert qh.collect(grounder, examples, tmp_path, progress=False, layers=(1,)) == 0
    items = qh.load_items(tmp_path)
    assert len(items) == 2
    item = next(it for it in items if it["id"] == "q0")
    enc = grounder.encode([DOC])
    window = enc[0].windows[0]
    lengths = [len(enc[0].segment_ids[s]) for s in range(window.first, window.last)]
    with torch.inference_mode():
        att = question_pass(grounder.runner, window, grounder.template.query_ids(
            grounder.tokenizer, QUESTION, grounder.config.max_query_tokens), 0, None, lengths).attention
    want = ranker.fused(item["log_prior"], 0, att)
    # queries and keys are stored in float16 (5 MB a question on the real model): close, and the same order
    got = qh.fused_scores(item, ranker, None)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert torch.equal(torch.argsort(got, descending=True), torch.argsort(want, descending=True))

    def answer_mass(update) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(qh.fused_scores(item, ranker, update), 0)
        return float(torch.logsumexp(logp[item["answer"]], 0))

    assert answer_mass(None) < -0.3
    a, b = qh.train_update([item], ranker, epochs=30, lr=3e-2, rank=2)
    trained = ranker.with_query_update((1,), a, b)
    assert answer_mass(trained.query_update) > answer_mass(None) + 0.05


def test_a_query_update_trained_through_another_ranker_is_refused(tmp_path):
    """After ``cfic fit-attention`` refits the ranker, an update trained through the old weights is stale: switched
    on, loading says so instead of grounding with weights nobody fitted together."""
    import json

    from cfic.models import ModelLoadError, adapter_query_ranker, adapter_settings

    rng = np.random.default_rng(5)
    old = AttentionRanker(rng.normal(size=(2, 4, 3)).astype(np.float32), 0.0, 2.0)
    new = AttentionRanker(rng.normal(size=(2, 4, 3)).astype(np.float32), 0.0, 2.0)
    update = (1,), rng.normal(size=(1, 3, 8, 2)).astype(np.float32), rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    old.with_query_update(*update).save(tmp_path / "queries.safetensors")
    new.save(tmp_path / "ranker.safetensors")
    entry = {"file": "ranker.safetensors", "query_update": {"file": "queries.safetensors", "enabled": False}}
    (tmp_path / "cfic.json").write_text(json.dumps({"attention": entry}))
    assert adapter_settings(tmp_path)["attention"] == new  # switched off: the ranker alone, the file never read
    with pytest.raises(ModelLoadError):
        adapter_query_ranker(tmp_path)
    entry["query_update"]["enabled"] = True
    (tmp_path / "cfic.json").write_text(json.dumps({"attention": entry}))
    with pytest.raises(ModelLoadError):
        adapter_settings(tmp_path)
    new.with_query_update(*update).save(tmp_path / "queries.safetensors")  # refitted through the new ranker
    assert adapter_settings(tmp_path)["attention"] == new.with_query_update(*update)
    with pytest.raises(CficError):  # a corrupt update (wrong rank) is a clear error, not an IndexError
        new.with_query_update((1,), update[1][0], update[2])

"""SwiftKV distillation on the tiny model: the loss, checkpoints, resume, and the parameter file it writes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_tiny_loaded

from cfic import CficError, GroundingConfig
from cfic.decoding.encode import PromptTemplate
from cfic.decoding.runner import LayerRunner
from cfic.decoding.swiftkv import SwiftKV
from cfic.grounder import Grounder
from cfic.models import eos_token_ids
from cfic.training.distill import DistillSettings, distill, distill_items, distill_loss

LAYERS = 4


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return make_tiny_loaded(tokenizer, layers=LAYERS, seed=7)


def settings_for(tmp_path, **kw) -> DistillSettings:
    base = dict(out=str(tmp_path / "run"), layer=2, group=2, q_rank=2, steps=2, accumulate=1, limit=3, passages=2,
                answer_tokens=8, checkpoint_every=1, autocast=False, lr=1e-2, warmup=1)
    return DistillSettings(**(base | kw))


def test_items_come_from_the_training_split_and_end_with_the_continuation(loaded, tmp_path):
    from cfic.eval import load_split

    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(loaded.tokenizer, config.instruction,
                                           eos_token_ids(loaded.model, loaded.tokenizer))
    items = distill_items(loaded.tokenizer, template, config, settings_for(tmp_path, limit=5))
    assert 1 <= len(items) <= 5
    train_q = {e.question for e in load_split("nq", "train", k=2, limit=5)}
    eval_q = {e.question for e in load_split("nq", "eval", k=2)}
    assert train_q.isdisjoint(eval_q)
    texts = [loaded.tokenizer.decode(item.ids[: item.n_prompt]) for item in items]
    assert all(any(q in t for q in train_q) for t in texts)
    assert all(0 < len(item.ids) - item.n_prompt <= 8 for item in items)


def test_loss_vanishes_where_swiftkv_is_exact(loaded, tmp_path):
    """At l = L-1 the zero-training student is the teacher: the training path must see no difference there."""
    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(loaded.tokenizer, config.instruction,
                                           eos_token_ids(loaded.model, loaded.tokenizer))
    settings = settings_for(tmp_path)
    item = distill_items(loaded.tokenizer, template, config, settings)[0]
    teacher = LayerRunner(loaded.model)
    exact = distill_loss(teacher, LayerRunner(loaded.model, SwiftKV(loaded.model, LAYERS - 1, 1)), item, settings)
    lossy = distill_loss(teacher, LayerRunner(loaded.model, SwiftKV(loaded.model, 1, 2)), item, settings)
    assert float(exact[1]) < 1e-4 and float(exact[2]) < 1e-5
    assert float(lossy[1]) > 1e-3


def test_distill_writes_loadable_parameters_and_resumes(loaded, tmp_path):
    before = SwiftKV(loaded.model, 2, 2, q_rank=2).state_dict()
    first = distill(settings_for(tmp_path), progress=False, loaded=loaded)
    assert first["steps"] == 2 and first["stopped_by"] == "steps"
    path = tmp_path / "run" / "swiftkv.safetensors"
    sw = SwiftKV.load(path, loaded.model)
    assert (sw.layer, sw.group, sw.q_rank) == (2, 2, 2)
    assert sw.info["steps"] == 2
    assert any(not torch.allclose(before[k], v, atol=1e-3) for k, v in sw.state_dict().items())  # it trained
    resumed = distill(settings_for(tmp_path, steps=3), progress=False, loaded=loaded)
    assert resumed["steps"] == 3
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert SwiftKV.load(path, loaded.model).info["steps"] == 3
    assert Grounder(loaded, None, SwiftKV.load(path, loaded.model)).ground("Who?", ["A. B. C."]).evidence
    with pytest.raises(CficError):
        distill(settings_for(tmp_path, group=1, steps=4), progress=False, loaded=loaded)


def test_module_imports_without_torch():
    import subprocess

    code = "import sys, cfic.training.distill; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr

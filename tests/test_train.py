"""LoRA training: items match inference prompts, the loss covers the evidence only, checkpoints resume."""

from __future__ import annotations

import json

import pytest
import torch

from cfic.eval.datasets import Example
from cfic.text import Sentence
from cfic.training.calibration import calibration_examples, choose_threshold
from cfic.training.lora import TrainSettings, train
from cfic.training.lora_items import build_items, gold_runs, item_tensors, squad_windows

DOC = "Alpha is first. Beta is second. Gamma is third.\nDelta is fourth. Epsilon is fifth."


def test_gold_runs_group_consecutive_sentences():
    sents = [Sentence(0, 5, "a"), Sentence(6, 10, "b"), Sentence(11, 15, "c"), Sentence(16, 20, "d")]
    assert gold_runs(sents, [(0, 3), (7, 8), (17, 19)]) == [(0, 2), (3, 4)]
    assert gold_runs(sents, []) == []


def test_items_use_the_inference_prompt_and_decoder_tokenisation(tiny_grounder):
    g = tiny_grounder
    start = DOC.index("Beta")
    end = DOC.index("Gamma is third.") + len("Gamma is third.")
    ex = Example("x", "Which is second?", ("Beta",), (DOC,), ((0, start, end),))
    no = Example("y", "Which is sixth?", (), (DOC,), (), answerable=False)
    items = build_items(g.tokenizer, g.template, g.config, [ex, no], "test", max_prompt_tokens=10_000)
    assert len(items) == 2
    enc = g.encode([DOC])[0]
    q_ids = g.template.query_ids(g.tokenizer, ex.question, g.config.max_query_tokens)
    expected_prompt = list(g.template.head_ids) + [t for seg in enc.segment_ids for t in seg] + q_ids
    assert list(items[0].prompt_ids) == expected_prompt
    # evidence = sentence 1 as emitted at an answer start + sentence 2 as in the document, then end-of-evidence
    assert list(items[0].target_ids) == list(enc.answer_ids[1]) + list(enc.segment_ids[2]) + [g.template.eos_ids[0]]
    assert list(items[1].target_ids) == [g.template.eos_ids[0]]
    ids, labels = item_tensors(items[0])
    n_prompt = len(items[0].prompt_ids)
    assert (labels[0, :n_prompt] == -100).all()
    assert labels[0, n_prompt:].tolist() == list(items[0].target_ids)
    assert ids.shape == labels.shape


def test_prompts_that_need_windowing_are_skipped(tiny_grounder):
    g = tiny_grounder
    ex = Example("x", "q?", ("a",), (DOC,), ((0, 0, 5),))
    assert build_items(g.tokenizer, g.template, g.config, [ex], "t", max_prompt_tokens=10) == []


def test_train_saves_resumes_and_the_adapter_changes_the_model(tmp_path, tiny_model_folder):
    out = tmp_path / "run"
    base = dict(out=str(out), model=str(tiny_model_folder), batch=2, lr=5e-3, warmup=1, max_examples=6,
                checkpoint_every=2, nq_passages=2, dtype="float32")
    first = train(TrainSettings(steps=3, **base), progress=False)
    assert first["steps"] == 3 and first["items"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    resumed = train(TrainSettings(steps=5, **base), progress=False)
    assert resumed["steps"] == 5
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert len(state["losses"]) == 5  # the resumed run continued the first one's loss history
    assert json.loads((out / "summary.json").read_text())["steps"] == 5

    from cfic.models import load_model

    plain = load_model(tiny_model_folder, dtype="float32", adapter=None)
    tuned = load_model(tiny_model_folder, dtype="float32", adapter=out / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert not torch.allclose(plain.model(ids).logits, tuned.model(ids).logits)
    assert tuned.adapter is not None and tuned.name.endswith("+adapter")

    # The threshold was calibrated after training and comes with the adapter (unless the caller sets one).
    from cfic.eval.methods import EvalContext
    from cfic.grounder import Grounder

    calibration = json.loads((out / "adapter" / "cfic.json").read_text())
    assert 0.0 <= calibration["threshold"] <= 1.0 and calibration["examples"] >= 1
    g = Grounder.from_pretrained(tiny_model_folder, dtype="float32", adapter=out / "adapter")
    assert g.config.threshold == calibration["threshold"]
    assert Grounder.from_pretrained(tiny_model_folder, dtype="float32", adapter=out / "adapter",
                                    threshold=None).config.threshold is None
    # The evaluation's zero-shot method runs the same model without the adapter.
    ctx = EvalContext(str(tiny_model_folder), grounder=g)
    zero = ctx.zero_shot_grounder
    assert zero is not g and zero.loaded.adapter is None and zero.config.threshold is None
    with torch.inference_mode():
        assert not torch.allclose(zero.loaded.model(ids).logits, g.loaded.model(ids).logits)


def test_bad_adapter_settings_are_a_clear_error(tmp_path):
    from cfic.errors import ModelLoadError
    from cfic.models import adapter_threshold

    assert adapter_threshold(None) is None and adapter_threshold(tmp_path) is None
    (tmp_path / "cfic.json").write_text('{"threshold": 2}')
    with pytest.raises(ModelLoadError, match="threshold"):
        adapter_threshold(tmp_path)
    (tmp_path / "cfic.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="unreadable"):
        adapter_threshold(tmp_path)


def test_choose_threshold_maximises_right_abstentions():
    chosen = choose_threshold([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
    assert chosen["threshold"] == 0.8 and chosen["accuracy"] == 1.0
    assert chosen["accuracy_without_threshold"] == 0.5 and chosen["unanswerable"] == 2
    # 4 of 5 right at both 0.1 and 0.8 (one mistake either way): the tie goes to the lower threshold
    assert choose_threshold([0.9, 0.8, 0.3, 0.1, 0.05], [True, True, False, True, False])["threshold"] == 0.1
    assert choose_threshold([0.5, 0.4], [True, True])["threshold"] == 0.0  # ties go to abstaining least
    with pytest.raises(ValueError):
        choose_threshold([], [])


def test_squad_training_windows_keep_the_gold_and_leave_the_calibration_questions_out():
    from cfic.training.lora_items import squad_lora_article

    settings = TrainSettings()
    train_side = squad_lora_article()  # what the LoRA recipe trains on (the abstention fit's second article is not)
    windows = squad_windows(train_side, paragraphs=5, seed=0)
    assert len(windows) > 0.9 * len(train_side)
    original = {ex.id: ex for ex in train_side}
    for w in windows:
        doc, text = original[w.id].documents[0], w.documents[0]
        assert text.startswith("Title: Computational complexity theory\n")
        assert text.count("\n\n") <= 4 and len(text) < len(doc) and text[text.index("\n") + 1:] in doc
        assert [text[a:b] for _, a, b in w.gold] == [doc[a:b] for _, a, b in original[w.id].gold]
    held = {ex.id for ex in calibration_examples(settings)}
    assert 0.15 * len(train_side) < len(held) < 0.35 * len(train_side)
    assert any(not ex.answerable for ex in calibration_examples(settings))
    assert squad_windows(train_side, 5, 0) == windows  # seeded


def test_a_failed_folder_swap_keeps_the_previous_folder(tmp_path, monkeypatch):
    """write_folder_atomic: when the new folder cannot be moved in, the previous one is put back, not deleted; a
    half-written folder is replaced even with replace=False; a kill between the renames leaves a findable copy."""
    from pathlib import Path

    from cfic.files import previous_folder, write_folder_atomic

    target = tmp_path / "checkpoint"
    write_folder_atomic(target, lambda f: (f / "state").write_text("one"))
    real_rename = Path.rename

    def failing(self, dest):
        if Path(dest) == target and self.name != target.name:
            raise OSError("disk full")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        write_folder_atomic(target, lambda f: (f / "state").write_text("two"))
    monkeypatch.undo()
    assert (target / "state").read_text() == "one"
    assert not list(tmp_path.glob(".checkpoint.*"))  # no temp or aside copies left behind

    model = tmp_path / "model"
    model.mkdir()  # an empty leftover from an interrupted conversion
    write_folder_atomic(model, lambda f: (f / "config.json").write_text("{}"), replace=False,
                        complete=lambda f: (f / "config.json").is_file())
    assert (model / "config.json").is_file()
    write_folder_atomic(model, lambda f: (f / "other").write_text("x"), replace=False,
                        complete=lambda f: (f / "config.json").is_file())
    assert not (model / "other").exists()  # a finished folder is kept

    aside = tmp_path / ".checkpoint.old.abc" / "checkpoint"
    aside.mkdir(parents=True)
    real_rename(target, tmp_path / "gone")
    assert previous_folder(target) == aside

"""`evaluate` end to end on a tiny NQ-format file with the tiny model: every method, the report files, the
evidence budget, reproducibility, and errors for bad input."""

from __future__ import annotations

import json

import pytest
import typer
from test_eval_datasets import TOPICS, record  # tests/ is on sys.path (rootdir-relative imports)
from typer.testing import CliRunner

from cfic.errors import CficError
from cfic.eval.cli import evaluate_command
from cfic.eval.methods import METHOD_NAMES
from cfic.eval.runner import evaluate

TIMING = ("latency_ms", "encode_ms", "prefix_ms", "skip_ms", "generate_ms", "wall_seconds")


@pytest.fixture
def nq_file(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(record(*t)) + "\n" for t in TOPICS[:5]))
    return path


@pytest.fixture(scope="module")
def small_grounder(tiny_loaded):
    """The tiny model with a short span budget (the token-by-token ablation stays quick) and a sentence prior (the
    ``prior`` method needs its weights)."""
    from cfic.config import GroundingConfig
    from cfic.grounder import Grounder
    from cfic.prior import PriorWeights

    return Grounder(tiny_loaded, GroundingConfig(max_span_tokens=32, max_sentence_tokens=32,
                                                 prior=PriorWeights(10.0, 10.0, 0.5, 1.0)))


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if not k.startswith(TIMING)}
    return obj


def test_every_method_on_the_same_documents_writes_the_report(nq_file, tmp_path, small_grounder):
    out = tmp_path / "report"
    report = evaluate("nq", data_file=nq_file, k=3, limit=3, seed=1, out=out, grounder=small_grounder,
                      progress=False, generate_max_tokens=12)
    assert report["n"] == 3 and report["seed"] == 1 and report["model"] == small_grounder.model_name
    assert list(report["methods"]) == list(METHOD_NAMES)
    for name, row in report["methods"].items():
        for key in ("answer_recall", "sentence_f1", "evidence_tokens", "compression", "verbatim_rate",
                    "latency_ms_p50", "latency_ms_p95"):
            assert key in row, (name, key)
        assert row["n"] == 3
    assert report["methods"]["cfic"]["verbatim_rate"] == 1.0
    assert report["methods"]["cfic-no-skip"]["verbatim_rate"] == 1.0
    # Without an adapter the zero-shot model is the model itself: the same evidence as cfic.
    assert without_timing(report["methods"]["cfic-zero-shot"]) == without_timing(report["methods"]["cfic"])
    assert report["methods"]["full-document"]["answer_recall"] == 1.0
    assert report["methods"]["full-document"]["compression"] == 1.0
    assert {"encode_ms_p50", "prefix_ms_p50", "skip_ms_p50"} <= set(report["methods"]["cfic"])
    assert json.loads((out / "report.json").read_text()) == report
    table = (out / "report.md").read_text()
    assert all(f"`{name}`" in table for name in METHOD_NAMES)
    assert (out / "recall_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The sentence baselines got cfic's budget on every example.
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    by = {(r["method"], r["example_id"]): r for r in rows}
    for (method, ex_id), r in by.items():
        if method in ("bm25", "embedding", "random"):
            cfic = by[("cfic", ex_id)]
            assert r["evidence_sentences"] == cfic["evidence_sentences"] or cfic["evidence_sentences"] == 0


def test_same_seed_same_numbers(nq_file, tiny_grounder):
    kwargs = dict(data_file=nq_file, k=3, methods="cfic,bm25,random", grounder=tiny_grounder, progress=False)
    first = evaluate("nq", seed=5, **kwargs)
    assert without_timing(first) == without_timing(evaluate("nq", seed=5, **kwargs))


def test_without_cfic_baselines_use_the_default_budget(nq_file, tiny_grounder):
    report = evaluate("nq", data_file=nq_file, k=4, methods="bm25,random", grounder=tiny_grounder,
                      progress=False)
    assert report["methods"]["bm25"]["evidence_sentences"] == pytest.approx(3.0)
    assert "3 sentences" in report["budget"]


def test_bad_input_is_a_clear_error(nq_file, tmp_path, tiny_grounder):
    with pytest.raises(CficError, match="unknown dataset"):
        evaluate("imagenet", grounder=tiny_grounder)
    with pytest.raises(CficError, match="unknown method 'magic'"):
        evaluate("nq", methods="cfic,magic", grounder=tiny_grounder)
    with pytest.raises(CficError, match="--limit"):
        evaluate("nq", limit=0, grounder=tiny_grounder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(nq_file.read_text() + "[1, 2]\n")
    with pytest.raises(CficError, match=r"bad\.jsonl:6: expected a JSON object"):
        evaluate("nq", data_file=bad, grounder=tiny_grounder)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(CficError, match="not a directory"):
        evaluate("nq", data_file=nq_file, out=a_file, grounder=tiny_grounder)


def test_cli_command_rejects_bad_options_before_loading_anything(tmp_path):
    app = typer.Typer()
    app.command()(evaluate_command)
    runner = CliRunner()
    for args, message in ((["--limit", "0"], "--limit"), (["--dataset", "nope"], "unknown dataset"),
                          (["--methods", "bm25,nope"], "unknown method"),
                          (["--data-file", str(tmp_path / "missing.jsonl")], "does not exist")):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
        assert isinstance(result.exception, CficError), args
        assert message in str(result.exception)


def test_a_killed_run_resumes_from_its_journal_without_losing_or_repeating_examples(nq_file, tmp_path,
                                                                                      small_grounder):
    kwargs = dict(data_file=nq_file, k=3, limit=4, seed=2, methods="cfic,bm25", grounder=small_grounder,
                  progress=False)
    full = evaluate("nq", out=tmp_path / "full", **kwargs)
    journal = (tmp_path / "full" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 4
    # A run killed while writing its third example: two whole lines and half of the third.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "journal.jsonl").write_text("\n".join(journal[:3]) + "\n" + journal[3][: len(journal[3]) // 2])
    resumed = evaluate("nq", out=killed, resume=True, **kwargs)
    assert without_timing(resumed) == without_timing(full)
    lines = (killed / "journal.jsonl").read_text().splitlines()
    assert lines[:3] == journal[:3]  # the finished examples were kept, not run again (same recorded times)
    assert [json.loads(line)["example_id"] for line in lines[1:]] == \
        [json.loads(line)["example_id"] for line in journal[1:]]
    rows = [json.loads(line) for line in (killed / "examples.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["example_id"]) for r in rows) == \
        sorted({(r["method"], r["example_id"]) for r in rows})  # no example counted twice


def test_resume_refuses_a_journal_written_with_other_settings(nq_file, tmp_path, small_grounder):
    kwargs = dict(data_file=nq_file, k=3, limit=2, methods="bm25", grounder=small_grounder, progress=False)
    evaluate("nq", out=tmp_path, seed=1, **kwargs)
    with pytest.raises(CficError, match="seed"):
        evaluate("nq", out=tmp_path, seed=2, resume=True, **kwargs)
    with pytest.raises(CficError, match="--out"):
        evaluate("nq", seed=1, resume=True, **kwargs)
    # a refit between sessions (other prior weights in the loaded configuration) is another run, not a continuation
    kwargs |= {"methods": "cfic", "out": tmp_path / "cfic"}
    evaluate("nq", seed=1, **kwargs)
    refit = small_grounder.__class__(small_grounder.loaded, small_grounder.config.with_options(
        prior=small_grounder.config.prior.__class__(1.0, 1.0, 1.0, 1.0)))
    with pytest.raises(CficError, match="config"):
        evaluate("nq", seed=1, resume=True, **{**kwargs, "grounder": refit})


def test_acceleration_options_add_their_own_row_next_to_cfic(nq_file, tmp_path, small_grounder):
    from cfic.eval.methods import EvalContext

    accel = {"options": {"swiftkv_layer": 1, "layer_skip": 1, "layer_skip_warmup": 0}, "swiftkv": None}
    ctx = EvalContext(grounder=small_grounder, acceleration=accel)
    g = ctx.accel_grounder
    assert g.loaded is small_grounder.loaded and g.sentence_prior is small_grounder.sentence_prior
    assert (g.config.swiftkv_layer, g.config.layer_skip) == (1, 1) and g.swiftkv is not None
    assert g.config.prior == small_grounder.config.prior and g.model_key != small_grounder.model_key

    kwargs = dict(data_file=nq_file, k=3, limit=2, seed=1, grounder=small_grounder, progress=False)
    report = evaluate("nq", methods="cfic", out=tmp_path / "a", acceleration=accel, **kwargs)
    assert list(report["methods"]) == ["cfic", "cfic-accel"] and report["acceleration"] == accel
    assert report["methods"]["cfic-accel"]["n"] == 2 and report["methods"]["cfic-accel"]["verbatim_rate"] == 1.0
    with pytest.raises(CficError, match="acceleration"):  # another acceleration is another run
        evaluate("nq", methods="cfic", out=tmp_path / "a", resume=True,
                 acceleration={"options": {"swiftkv_layer": 1}, "swiftkv": None}, **kwargs)
    with pytest.raises(CficError, match="needs an acceleration option"):
        evaluate("nq", methods="cfic,cfic-accel", **kwargs)


def test_cli_acceleration_options_are_checked_before_loading_anything(tmp_path):
    app = typer.Typer()
    app.command()(evaluate_command)
    for args, message in ((["--swiftkv-group", "2"], "needs --swiftkv-layer"),
                          (["--swiftkv", str(tmp_path / "nope.safetensors")], "no such file"),
                          (["--layer-skip-warmup", "2"], "needs --layer-skip")):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
        assert isinstance(result.exception, CficError), args
        assert message in str(result.exception)


def test_abstention_is_scored_and_every_threshold_is_reported(tmp_path, tiny_loaded):
    """SQuAD questions with an abstention model that always says "no evidence": cfic is scored as abstaining, yet the
    evidence it would have given is kept, so the report shows what never abstaining would have scored."""
    import numpy as np

    from cfic.answerability import AnswerabilityProbe
    from cfic.grounder import Grounder
    from cfic.prior import PROBE_FEATURE, Abstention

    hidden = tiny_loaded.model.config.hidden_size
    probe = AnswerabilityProbe(1, np.zeros(hidden, np.float32), np.ones(hidden, np.float32),
                               np.zeros(hidden, np.float32), 3.0)  # P(no evidence) = 0.95 for every question
    base = Grounder(tiny_loaded)
    g = Grounder(tiny_loaded, base.config.with_options(
        abstention=Abstention((1.0,), 0.0, 0.9, (PROBE_FEATURE,), probe), max_span_tokens=32,
        max_sentence_tokens=32))
    out = tmp_path / "squad"
    report = evaluate("squad", limit=8, seed=0, methods="cfic,bm25", grounder=g, progress=False, out=out)
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    cfic = [r for r in rows if r["method"] == "cfic"]
    assert all(r["no_evidence"] and r["evidence_sentences"] == 0 for r in cfic)
    assert all(r["no_evidence_probability"] == pytest.approx(1 / (1 + np.exp(-3.0))) for r in cfic)
    answerable = [r for r in cfic if r["answerable"]]
    assert answerable and all(r["answer_hit"] is False for r in answerable)
    tradeoff = report["abstention"]
    assert tradeoff["shipped"]["abstained_on_answerable"] == 1.0
    assert tradeoff["shipped"]["answerable_recall"] == 0.0
    never = max(tradeoff["curve"], key=lambda c: c["threshold"])
    assert never["abstained_on_answerable"] == 0.0
    assert never["answerable_recall"] == pytest.approx(np.mean([r["answered_hit"] for r in answerable]))
    assert never["no_evidence_accuracy"] == pytest.approx(np.mean([r["answerable"] for r in cfic]))
    assert (out / "abstention_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "Abstention (cfic)" in (out / "report.md").read_text()


def test_the_training_split_is_measured_on_request_and_named_in_the_report(tiny_grounder, tmp_path):
    """``split="train"`` reads the training side (where design choices are decided), never the evaluation one."""
    from cfic.eval.datasets import load_split

    report = evaluate("hotpotqa", split="train", limit=2, methods="bm25", grounder=tiny_grounder, progress=False,
                      out=tmp_path / "t")
    assert report["split"] == "train" and report["n"] == 2
    ids = {json.loads(line)["example_id"] for line in (tmp_path / "t" / "examples.jsonl").read_text().splitlines()}
    assert ids == {e.id for e in load_split("hotpotqa", "train", limit=2)}
    assert not ids & {e.id for e in load_split("hotpotqa", "eval")}
    assert "(train split)" in (tmp_path / "t" / "report.md").read_text()
    with pytest.raises(CficError, match="no 'train' split"):
        evaluate("nq-long", split="train", methods="bm25", grounder=tiny_grounder)


def test_options_that_keep_the_encoding_share_it_between_cfic_and_cfic_accel(nq_file, small_grounder, tmp_path):
    """FFN skipping leaves the encoding alone: the accelerated row reads cfic's encoding instead of its own (one
    prefill per document, so both rows report the very same encode time)."""
    from cfic.eval.methods import EvalContext

    accel = {"options": {"ffn_skip": 0.9}, "swiftkv": None}
    assert EvalContext(grounder=small_grounder, acceleration=accel).accel_grounder.model_key == \
        small_grounder.model_key
    report = evaluate("nq", data_file=nq_file, k=3, limit=2, seed=1, methods="cfic", grounder=small_grounder,
                      progress=False, acceleration=accel, out=tmp_path)
    assert report["methods"]["cfic-accel"]["n"] == 2 and report["methods"]["cfic-accel"]["verbatim_rate"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    encode = {(r["method"], r["example_id"]): r["stages"]["encode_ms"] for r in rows}
    assert {e for _, e in encode} and all(encode["cfic", e] == encode["cfic-accel", e] for _, e in encode)


def test_a_span_budget_row_shares_cfics_encodings_and_keeps_its_spans_within_the_budget(nq_file, tiny_grounder):
    """cfic-budget<N>: cfic with a shorter skip-decoding budget on cfic's own encodings, side by side and paired."""
    from cfic.grounder import Grounder

    g = Grounder(tiny_grounder.loaded, tiny_grounder.config.with_options(max_span_tokens=128,
                                                                          max_sentence_tokens=32))
    encodes = []
    real_encode = g.encode
    g.encode = lambda docs, *a, **kw: encodes.append(1) or real_encode(docs, *a, **kw)  # count, do not change
    report = evaluate("nq", data_file=nq_file, k=4, limit=3, methods="cfic,cfic-budget32", grounder=g,
                      progress=False)
    assert len(encodes) == 3  # one encoding per example, read by both rows
    short, full = report["methods"]["cfic-budget32"], report["methods"]["cfic"]
    assert short["evidence_tokens"] <= full["evidence_tokens"]
    with pytest.raises(CficError, match="unknown method 'cfic-budgetx'"):
        evaluate("nq", data_file=nq_file, methods="cfic,cfic-budgetx", grounder=g, progress=False)

"""``evaluate``: every requested method on the same examples, one example at a time, then the report.

Per example, the method that sets the evidence budget (``cfic``, else ``cfic-no-skip``) runs first; the
other methods then get the same number of sentences (see :mod:`cfic.eval.methods`).

Latency per example is wall time: the method's per-document preparation (cfic's encoding, the bm25 index,
the sentence embeddings), divided by the number of evaluated examples that share those documents, plus the
time to answer the question. NQ and HotpotQA give every question its own document, so there the whole
encoding counts; SQuAD and NQ-long ask many questions about one document, which is what a reusable encoding
is for. ``encode_ms`` is reported per document (once, on the first example that needed it). When two methods
share prepared state (cfic and cfic-no-skip share the encoding), each is charged the preparation time
measured once.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.eval.datasets import Example, load_split
from cfic.eval.journal import JOURNAL_NAME, JournalEntry, JournalWriter, read_journal
from cfic.eval.methods import (
    ACCEL_METHOD,
    DEFAULT_BUDGET,
    GENERATE_MAX_TOKENS,
    Budget,
    CficMethod,
    EvalContext,
    Method,
    make_methods,
    parse_methods,
)
from cfic.eval.metrics import ExampleScore, Interval, aggregate, score_example
from cfic.text import split_sentences

BUDGET_SOURCES = ("cfic", "cfic-no-skip")


def _reference_units(documents: Sequence[str]) -> list[Interval]:
    return [(d, s.start, s.end) for d, text in enumerate(documents) for s in split_sentences(text)]


def run_methods(
    examples: Sequence[Example],
    methods: Sequence[Method],
    ctx: EvalContext,
    *,
    progress: bool = True,
    desc: str = "evaluate",
    done: Sequence[JournalEntry] = (),
    on_example: Callable[[JournalEntry], None] | None = None,
) -> tuple[dict[str, list[ExampleScore]], dict[str, int]]:
    """Score every method on every example; also count examples where ``generate`` had to cut the document.

    ``done`` are the first examples' entries from an earlier, interrupted run (they are not run again);
    ``on_example`` receives each newly finished example (the journal writer).
    """
    from tqdm.auto import tqdm

    if [e.example_id for e in done] != [ex.id for ex in examples[: len(done)]]:
        raise CficError("the journal's examples are not the first examples of this run; start over without --resume")

    order = sorted(methods, key=lambda m: 0 if m.name in BUDGET_SOURCES else 1)
    source = next((m.name for m in order if m.name in BUDGET_SOURCES), None)
    shares = Counter(ex.doc_key or ex.id for ex in examples)
    scores: dict[str, list[ExampleScore]] = {m.name: [] for m in methods}
    truncated: Counter[str] = Counter()
    for entry in done:
        for name in scores:
            scores[name].append(entry.scores[name])
        truncated.update(entry.truncated)
    states: dict[str, tuple[str, Any, float]] = {}  # state key -> (doc key, state, prepare ms)
    units_cache: tuple[str, list[Interval], list[int]] | None = None
    encode_reported: set[tuple[str, str]] = set()
    bar = tqdm(examples[len(done):], desc=desc, unit="ex", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, initial=len(done), total=len(examples))
    for ex in bar:
        started = time.perf_counter()
        finished: dict[str, ExampleScore] = {}
        flags: dict[str, int] = {}
        key = ex.doc_key or ex.id
        if units_cache is None or units_cache[0] != key:
            units_cache = (key, _reference_units(ex.documents), ctx.count_tokens(list(ex.documents)))
        units, doc_tokens = units_cache[1], sum(units_cache[2])
        budget = Budget(DEFAULT_BUDGET, None)
        for method in order:
            state_key = method.state_key or method.name
            stages: dict[str, float] = {}
            cached = states.get(state_key)
            if cached is None or cached[0] != key:
                t0 = time.perf_counter()
                state = method.prepare(ctx, ex.documents)
                prepare_ms = (time.perf_counter() - t0) * 1000
                states[state_key] = (key, state, prepare_ms)
            else:
                state, prepare_ms = cached[1], cached[2]
            if isinstance(method, CficMethod) and (method.name, key) not in encode_reported:
                encode_reported.add((method.name, key))  # once per document and method
                stages["encode_ms"] = prepare_ms
            t0 = time.perf_counter()
            out = method.run(ctx, ex, state, budget)
            run_ms = (time.perf_counter() - t0) * 1000
            stages.update(out.stages)
            spans = [] if out.abstained else out.spans
            evidence_tokens = sum(ctx.count_tokens([s.text for s in spans])) if spans else 0
            finished[method.name] = score_example(
                example_id=ex.id, documents=ex.documents, answers=ex.answers, answerable=ex.answerable,
                gold=ex.gold, units=units, spans=spans, no_evidence=out.no_evidence or out.abstained,
                evidence_tokens=evidence_tokens, document_tokens=doc_tokens,
                latency_ms=prepare_ms / shares[key] + run_ms, stages=stages,
                keep_text=method.name != "full-document",
                no_evidence_probability=out.no_evidence_probability, answered_spans=out.spans)
            scores[method.name].append(finished[method.name])
            truncated[method.name] += out.truncated
            if out.truncated:
                flags[method.name] = int(out.truncated)
            if method.name == source:
                n = out.sentences if out.sentences > 0 else DEFAULT_BUDGET
                budget = Budget(n, evidence_tokens or None)
        if on_example is not None:
            on_example(JournalEntry(ex.id, finished, flags, time.perf_counter() - started))
    return scores, dict(truncated)


def _config_fingerprint(ctx: EvalContext) -> str:
    import hashlib

    grounder = ctx.grounder
    return hashlib.sha256(f"{ctx.model_name}|{grounder.config!r}".encode()).hexdigest()[:16]


def evaluate(
    dataset: str = "nq",
    *,
    split: str = "eval",
    data_file: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    methods: str | Sequence[str] | None = None,
    out: str | Path | None = None,
    model: str | None = None,
    k: int | None = None,
    grounder: Any = None,
    progress: bool = True,
    command: str | None = None,
    generate_max_tokens: int = GENERATE_MAX_TOKENS,
    threshold: float | None = None,
    resume: bool = False,
    acceleration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the evaluation and return the report (also written to ``out`` when given).

    With ``out``, every finished example is journalled there at once (:mod:`cfic.eval.journal`); ``resume``
    continues an interrupted run with the same settings from its journal instead of starting over.

    ``grounder`` lets a caller pass an already loaded :class:`cfic.Grounder` (then ``model`` is ignored);
    ``generate_max_tokens`` caps the ``generate`` baseline's output length; ``threshold`` is cfic's score
    threshold (spans scoring below it are dropped, and with none left cfic reports no evidence).
    ``split``: ``"train"`` measures on the training side (where design choices and fitted values are decided; the
    ``eval`` split only measures them).
    ``acceleration`` (``{"options": {...}, "swiftkv": ...}``) adds the ``cfic-accel`` row: cfic with those options,
    next to ``cfic`` on the same examples.
    """
    names = parse_methods(methods)
    if acceleration is not None and ACCEL_METHOD not in names:
        names.append(ACCEL_METHOD)
    if acceleration is None and ACCEL_METHOD in names:
        raise CficError(f"{ACCEL_METHOD} needs an acceleration option (--swiftkv, --swiftkv-layer, --layer-skip, "
                        "--ffn-skip)")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CficError(f"--out {str(out)!r} exists and is not a directory")
    examples = load_split(dataset, split, k=k, seed=seed, limit=limit, data_file=data_file)
    if not examples:
        raise CficError(f"dataset {dataset!r} has no examples to evaluate")
    method_objs = make_methods(names, generate_max_tokens=generate_max_tokens, threshold=threshold)
    ctx = EvalContext(model=model, grounder=grounder, seed=seed, acceleration=acceleration)
    if any(m.needs_lm for m in method_objs):
        ctx.grounder  # load the model before the progress bar starts  # noqa: B018
    # A bad SwiftKV file or option fails here, before the journal starts. Options that leave the encoding alone
    # (FFN or layer skipping) let both rows read the same encoding.
    if ACCEL_METHOD in names and ctx.accel_grounder.model_key == ctx.grounder.model_key:
        for m in method_objs:
            if m.name == ACCEL_METHOD:
                m.state_key = CficMethod.state_key
    if any(m.needs_embedder for m in method_objs):
        ctx.embedder  # noqa: B018
    settings = {"dataset": dataset, "data_file": None if data_file is None else Path(data_file).name,
                "seed": seed, "methods": list(names), "k": k, "model": model, "threshold": threshold,
                "generate_max_tokens": generate_max_tokens,
                # the loaded configuration (fitted prior weights, abstention, budgets): a refit between two
                # sessions must not be mixed into one table
                "config": _config_fingerprint(ctx) if any(m.needs_lm for m in method_objs) else None}
    if split != "eval":  # only then: journals written before the option existed still resume
        settings["split"] = split
    if acceleration is not None:  # only then: journals written before the option existed still resume
        # with the accelerated grounder's key, which covers the SwiftKV file's contents: a re-distilled file at the
        # same path is another run
        settings["acceleration"] = {**acceleration, "model_key": ctx.accel_grounder.model_key}
    done: list[JournalEntry] = []
    writer = None
    if out is not None:
        journal = Path(out) / JOURNAL_NAME
        done = read_journal(journal, settings)[: len(examples)] if resume else []
        writer = JournalWriter(journal, settings)
        writer.start(done)
    elif resume:
        raise CficError("--resume needs --out (the folder whose journal to continue)")
    started = time.perf_counter() - sum(e.seconds for e in done)
    scores, truncated = run_methods(examples, method_objs, ctx, progress=progress, desc=f"evaluate {dataset}",
                                    done=done, on_example=writer.append if writer else None)
    with_no_evidence = any(not ex.answerable for ex in examples)
    rows = {}
    for name in names:
        row = aggregate(scores[name], with_no_evidence=with_no_evidence)
        if name == "generate":
            row["truncated"] = truncated.get(name, 0)
        rows[name] = row
    report: dict[str, Any] = {
        "dataset": dataset if data_file is None else f"{dataset}:{Path(data_file).name}",
        "split": split,
        "n": len(examples),
        "seed": seed,
        "model": ctx.model_name,
        "methods": rows,
        "k": (k or 20) if dataset == "nq" else None,
        "threshold": threshold,
        "budget": ("per example, the sentence count cfic returned" if any(n in BUDGET_SOURCES for n in names)
                   else f"{DEFAULT_BUDGET} sentences per example"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if acceleration is not None:
        report["acceleration"] = acceleration
    if with_no_evidence and "cfic" in scores and ctx._grounder is not None and ctx.grounder.config.abstention:
        from cfic.eval.report import abstention_tradeoff

        report["abstention"] = abstention_tradeoff(scores, ctx.grounder.config.abstention.threshold)
    if command:
        report["command"] = command
    if out is not None:
        from cfic.eval.report import write_report

        write_report(report, scores, Path(out))
    return report

"""The core part of ``cfic bench``: cold vs warm grounding, decoding overhead, dtypes, prior LM weights, model load."""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any

from cfic.benchmarks.common import QUESTIONS, Timings, bench_documents, matmul_gflops, prefill_flops


def _time_grounder(grounder, docs: list[str], questions: list[str], timings: Timings) -> None:
    """One cold query per document (encode + ground), then warm queries on the stored encoding."""
    for d, doc in enumerate(docs):
        encoding = timings.cold(grounder, doc, questions[d % len(questions)])
        for q in questions:
            timings.warm(grounder, q, encoding)


def _time_prior(grounder: Any, docs: list[str], questions: list[str], out: dict[str, list[float]]) -> None:
    """The ``prior`` row's work (no LM): cold = plan the document (split, tokens, sentence embeddings) and rank its
    sentences for one question; warm = rank them for a question on the stored plan."""
    import time

    import numpy as np

    from cfic.prior import SentencePrior

    def rank(question: str, plans: list) -> None:
        signals = grounder._signals(question, plans)
        np.argsort(-np.concatenate(SentencePrior.log_priors(signals, grounder.config.prior)))

    for d, doc in enumerate(docs):
        t = time.perf_counter()
        plans = grounder.plan([doc])
        rank(questions[d % len(questions)], plans)
        out["cold"].append((time.perf_counter() - t) * 1000)
        for q in questions:
            t = time.perf_counter()
            rank(q, plans)
            out["warm"].append((time.perf_counter() - t) * 1000)


def summary(timings: Timings) -> dict[str, float]:
    """Medians of one configuration's measurements."""
    med = statistics.median
    out = {"cold_ms": med(timings.cold_ms), "warm_ms": med(timings.warm_ms), "encode_ms": med(timings.encode_ms),
           "read_ms": med(timings.read_ms), "prefix_ms": med(timings.prefix_ms), "skip_ms": med(timings.skip_ms),
           "reading_ms": med(timings.reading_ms)}
    out["warm_over_cold"] = out["warm_ms"] / out["cold_ms"]
    return out


def bench_load(model: str | None, adapter: str | None = "auto") -> dict[str, float]:
    """Model load time: first use (GGUF conversion into an empty cache) vs later loads from the cache."""
    from cfic.models import load_model

    old = os.environ.get("CFIC_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CFIC_CACHE_DIR"] = tmp
        try:
            cold = load_model(model, adapter=adapter)
            cold_s = cold.load_seconds
            del cold
            cached = [load_model(model, adapter=adapter).load_seconds for _ in range(3)]
        finally:
            if old is None:
                os.environ.pop("CFIC_CACHE_DIR", None)
            else:
                os.environ["CFIC_CACHE_DIR"] = old
    return {"cold_s": cold_s, "cached_s": statistics.median(cached), "speedup": cold_s / statistics.median(cached)}


def encoding_flops(grounder: Any, n: float) -> float:
    """FLOPs of encoding an ``n``-token document with ``grounder``'s runner: with SwiftKV the layers from its layer
    on only project K/V for a document."""
    model, sw = grounder.loaded.model, grounder.runner.swiftkv
    if sw is None:
        return prefill_flops(model, n)
    return prefill_flops(model, n, layers=sw.layer, kv_only_layers=grounder.runner.num_layers - sw.layer)


def run_core_bench(model: str | None, doc_tokens: int, n_docs: int, n_questions: int, rounds: int,
                   dtypes: list[str], load: bool, adapter: str | None = "auto",
                   lm_weights: list[float] | None = None) -> dict[str, Any]:
    """``lm_weights``: extra configurations of the first dtype whose prior weighs the LM's prefix log-probabilities
    by each of these (the shipped weight 0 walks the trie without LM steps; any other weight runs them)."""
    from dataclasses import replace

    import torch

    from cfic.errors import CficError
    from cfic.grounder import Grounder

    report: dict[str, Any] = {"doc_tokens": doc_tokens, "documents": n_docs, "questions_per_document": n_questions,
                              "rounds": rounds, "torch_threads": torch.get_num_threads()}
    if load:
        report["model_load"] = bench_load(model, adapter)
    grounders = {dt: Grounder.from_pretrained(model, dtype=dt, adapter=adapter) for dt in dtypes}
    first = next(iter(grounders.values()))
    for w in lm_weights or []:
        if first.config.prior is None:
            raise CficError("--lm-weights needs a model with a sentence prior (the bundled adapter has one)")
        prior = replace(first.config.prior, lm=w)
        grounders[f"{dtypes[0]}, lm {w:g}"] = Grounder(first.loaded, first.config.with_options(prior=prior),
                                                        first.swiftkv)
    if first.config.attention is not None:  # what the attention ranker and the score span end cost, side by side
        from cfic.models import adapter_attention_entry

        grounders[f"{dtypes[0]}, no attention"] = Grounder(first.loaded, first.config.with_options(attention=None),
                                                           first.swiftkv, sentence_prior=first.sentence_prior)
        margin = adapter_attention_entry(first.loaded.adapter).get("score_end_margin")
        if isinstance(margin, (int, float)):
            grounders[f"{dtypes[0]}, score end"] = Grounder(
                first.loaded, first.config.with_options(score_end_margin=float(margin)), first.swiftkv,
                sentence_prior=first.sentence_prior)
    reading = first.config.question_likelihood
    if reading is not None and first.config.prior is not None:  # the paragraph reading, in the state not shipped
        flipped = first.config.with_options(question_likelihood=replace(reading, enabled=not reading.enabled))
        grounders[f"{dtypes[0]}, reading {'off' if reading.enabled else 'on'}"] = Grounder(
            first.loaded, flipped, first.swiftkv, sentence_prior=first.sentence_prior)
    report |= {"model": first.model_name, "adapter": first.loaded.adapter}
    docs = bench_documents(first.tokenizer, doc_tokens, n_docs)
    report["actual_doc_tokens"] = statistics.mean(e.n_tokens for e in first.encode(docs))
    questions = QUESTIONS[:n_questions]
    timings = {name: Timings() for name in grounders}
    prior_ms: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(rounds):  # interleaved: every round runs every configuration once
        for name, g in grounders.items():
            _time_grounder(g, docs, questions, timings[name])
        if first.config.prior is not None:
            _time_prior(first, docs, questions, prior_ms)
    report["configs"] = {name: summary(timings[name]) for name in grounders}
    if prior_ms["warm"]:
        p = {k: statistics.median(v) for k, v in prior_ms.items()}
        shipped = report["configs"][dtypes[0]]["warm_ms"]
        report["prior"] = {"cold_ms": p["cold"], "warm_ms": p["warm"], "shipped_warm_over_prior_cold": shipped
                           / p["cold"], "shipped_warm_over_prior_warm": shipped / p["warm"]}
    report["shipped_lm_weight"] = first.config.prior.lm if first.config.prior is not None else None
    if len(dtypes) == 2:
        a, b = dtypes
        report["dtype_comparison"] = {
            "baseline": a, "other": b,
            "cold_speedup": report["configs"][a]["cold_ms"] / report["configs"][b]["cold_ms"],
            "warm_speedup": report["configs"][a]["warm_ms"] / report["configs"][b]["warm_ms"],
            "same_evidence_rate": timings[a].same_evidence_rate(timings[b]),
        }
    if lm_weights:
        base = report["configs"][dtypes[0]]
        report["lm_weight_comparison"] = {
            name: {"warm_ratio": report["configs"][name]["warm_ms"] / base["warm_ms"],
                   "same_evidence_rate": timings[dtypes[0]].same_evidence_rate(timings[name])}
            for name in grounders if name not in dtypes}
    peak = {dt: matmul_gflops(getattr(torch, dt)) for dt in dtypes}
    for name, g in grounders.items():
        dt = str(g.runner.dtype).removeprefix("torch.")
        n = report["actual_doc_tokens"]
        # The prefill is the LM reading the document (``read_ms``); the encode also plans it (sentence split,
        # tokens, and the prior's MiniLM sentence embeddings), another model's work that counts in the encode only.
        seconds = report["configs"][name]["read_ms"] / 1000
        achieved = encoding_flops(g, n) / seconds / 1e9
        encode_gflops = encoding_flops(g, n) / (report["configs"][name]["encode_ms"] / 1000) / 1e9
        report["configs"][name] |= {"prefill_tokens_per_s": n / seconds, "prefill_gflops": achieved,
                                    "matmul_peak_gflops": peak[dt], "share_of_peak": achieved / peak[dt],
                                    "encode_share_of_peak": encode_gflops / peak[dt]}
    return report


def print_core_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"cfic core latency (~{report['actual_doc_tokens']:.0f}-token documents, medians)")
    for col in ("dtype", "cold ms", "warm ms", "warm/cold", "encode ms (LM read)", "reading ms", "prefix ms",
                "skip ms",
                "prefill tok/s", "GFLOP/s (peak)"):
        table.add_column(col, justify="right")
    for dt, c in report["configs"].items():
        table.add_row(dt, f"{c['cold_ms']:.0f}", f"{c['warm_ms']:.0f}", f"{c['warm_over_cold']:.1%}",
                      f"{c['encode_ms']:.0f} ({c['read_ms']:.0f})", f"{c['reading_ms']:.0f}",
                      f"{c['prefix_ms']:.0f}", f"{c['skip_ms']:.0f}",
                      f"{c['prefill_tokens_per_s']:.0f}",
                      f"{c['prefill_gflops']:.0f} ({c['matmul_peak_gflops']:.0f}, {c['share_of_peak']:.0%})")
    console.print(table)
    if "dtype_comparison" in report:
        d = report["dtype_comparison"]
        console.print(f"{d['other']} vs {d['baseline']}: cold {d['cold_speedup']:.2f}x, warm {d['warm_speedup']:.2f}x "
                      f"faster; same evidence on {d['same_evidence_rate']:.0%} of queries")
    for name, c in report.get("lm_weight_comparison", {}).items():
        console.print(f"{name}: warm {c['warm_ratio']:.2f}x the shipped configuration's (LM weight "
                      f"{report['shipped_lm_weight']:g}); same evidence on {c['same_evidence_rate']:.0%} of queries")
    base = report["configs"].get(next(iter(report["configs"])), {})
    for name, c in report["configs"].items():
        if name.endswith((", no attention", ", score end")):
            console.print(f"{name}: warm {c['warm_ms'] / base['warm_ms']:.2f}x the shipped configuration's")
    if "prior" in report:
        p = report["prior"]
        console.print(f"prior alone (no LM): cold {p['cold_ms']:.0f} ms, warm {p['warm_ms']:.1f} ms; a shipped warm "
                      f"question = {p['shipped_warm_over_prior_cold']:.2f}x the prior's cold question, "
                      f"{p['shipped_warm_over_prior_warm']:.0f}x its warm one")
    if "model_load" in report:
        m = report["model_load"]
        console.print(f"model load: first use {m['cold_s']:.1f} s (GGUF conversion), cached {m['cached_s']:.2f} s "
                      f"({m['speedup']:.0f}x)")

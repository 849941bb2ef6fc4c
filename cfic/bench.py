"""``cfic bench``: speed figures as ratios of configurations measured side by side in one run.

Every timed configuration runs interleaved with the one it is compared to (A, B, A, B, ...) on the same documents
and questions, and the figures are medians, so load from other processes hits both sides alike.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

QUESTIONS = [
    "When did William of Normandy conquer England?",
    "Who was the Norse leader who founded Normandy?",
    "What language did the Normans speak?",
    "In which century did the Normans gain their separate identity?",
    "Which island did the Normans conquer in the Mediterranean?",
    "What was the name of the Norman architecture style?",
]


def bench_documents(tokenizer, target_tokens: int, n_docs: int) -> list[str]:
    """Documents of about ``target_tokens`` tokens cut at paragraph ends from the bundled example article."""
    text = resources.files("cfic").joinpath("data/example.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    docs = []
    for start in range(n_docs):
        out, used = [], 0
        i = start  # each document starts at another paragraph, so documents differ
        while used < target_tokens:
            p = paragraphs[i % len(paragraphs)]
            used += len(tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"])
            out.append(p)
            i += 1
        docs.append("\n\n".join(out))
    return docs


def matmul_gflops(dtype, size: int = 2048, repeat: int = 10) -> float:
    """Measured matrix-multiply peak of this CPU (or GPU) for ``dtype``."""
    import torch

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e9


@dataclass
class Timings:
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)
    prefix_ms: list[float] = field(default_factory=list)
    skip_ms: list[float] = field(default_factory=list)
    evidence: list[list[tuple[int, int, int]]] = field(default_factory=list)

    def same_evidence_rate(self, other: Timings) -> float:
        """Share of the warm queries on which ``other`` returned exactly the same evidence."""
        return sum(x == y for x, y in zip(self.evidence, other.evidence, strict=True)) / len(self.evidence)

    def summary(self) -> dict[str, float]:
        med = statistics.median
        out = {"cold_ms": med(self.cold_ms), "warm_ms": med(self.warm_ms), "encode_ms": med(self.encode_ms),
               "prefix_ms": med(self.prefix_ms), "skip_ms": med(self.skip_ms)}
        out["warm_over_cold"] = out["warm_ms"] / out["cold_ms"]
        return out


def _time_grounder(grounder, docs: list[str], questions: list[str], timings: Timings) -> None:
    """One cold query per document (encode + ground), then warm queries on the stored encoding."""
    for d, doc in enumerate(docs):
        q0 = questions[d % len(questions)]
        t = time.perf_counter()
        enc = grounder.encode([doc])
        encode_ms = (time.perf_counter() - t) * 1000
        res = grounder.ground(q0, enc)
        timings.cold_ms.append(encode_ms + res.usage.latency_ms)
        timings.encode_ms.append(encode_ms)
        for q in questions:
            res = grounder.ground(q, enc)
            timings.warm_ms.append(res.usage.latency_ms)
            timings.prefix_ms.append(res.usage.prefix_ms)
            timings.skip_ms.append(res.usage.skip_ms)
            timings.evidence.append([(e.document_index, e.start_char, e.end_char) for e in res.evidence])


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
    report |= {"model": first.model_name, "adapter": first.loaded.adapter}
    docs = bench_documents(first.tokenizer, doc_tokens, n_docs)
    report["actual_doc_tokens"] = statistics.mean(e.n_tokens for e in first.encode(docs))
    questions = QUESTIONS[:n_questions]
    timings = {name: Timings() for name in grounders}
    for _ in range(rounds):  # interleaved: every round runs every configuration once
        for name, g in grounders.items():
            _time_grounder(g, docs, questions, timings[name])
    report["configs"] = {name: timings[name].summary() for name in grounders}
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
        seconds = report["configs"][name]["encode_ms"] / 1000
        sw = g.runner.swiftkv  # with SwiftKV the layers from its layer on only project K/V for a document
        layers = g.runner.num_layers
        flops = (prefill_flops(g.loaded.model, n) if sw is None
                 else prefill_flops(g.loaded.model, n, layers=sw.layer, kv_only_layers=layers - sw.layer))
        achieved = flops / seconds / 1e9
        report["configs"][name] |= {"prefill_tokens_per_s": n / seconds, "prefill_gflops": achieved,
                                    "matmul_peak_gflops": peak[dt], "share_of_peak": achieved / peak[dt]}
    return report


def prefill_flops(model, n: float, layers: int | None = None, kv_only_layers: int = 0) -> float:
    """FLOPs of a causal prefill of ``n`` tokens through ``layers`` full decoder layers (default: all), plus
    ``kv_only_layers`` layers of which only the K/V projections run (SwiftKV): the linear layers (2 x weights per
    token; embeddings are a lookup and the LM head does not run for a document) and causal attention
    (QK^T and PV over n^2/2 pairs per head)."""
    cfg = model.config
    layer0 = model.model.layers[0]
    full = layers if layers is not None else cfg.num_hidden_layers
    per_layer = sum(p.numel() for name, p in layer0.named_parameters() if p.dim() == 2)
    kv = layer0.self_attn.k_proj.weight.numel() + layer0.self_attn.v_proj.weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * 2 * (n * n / 2) * head_dim * cfg.num_attention_heads
    return full * (2 * per_layer * n + attention) + kv_only_layers * 2 * kv * n


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"cfic core latency (~{report['actual_doc_tokens']:.0f}-token documents, medians)")
    for col in ("dtype", "cold ms", "warm ms", "warm/cold", "encode ms", "prefix ms", "skip ms", "prefill tok/s",
                "GFLOP/s (peak)"):
        table.add_column(col, justify="right")
    for dt, c in report["configs"].items():
        table.add_row(dt, f"{c['cold_ms']:.0f}", f"{c['warm_ms']:.0f}", f"{c['warm_over_cold']:.1%}",
                      f"{c['encode_ms']:.0f}", f"{c['prefix_ms']:.0f}", f"{c['skip_ms']:.0f}",
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
    if "model_load" in report:
        m = report["model_load"]
        console.print(f"model load: first use {m['cold_s']:.1f} s (GGUF conversion), cached {m['cached_s']:.2f} s "
                      f"({m['speedup']:.0f}x)")


def bench_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="Model folder (default: packaged SmolLM2).")] = None,
    doc_tokens: Annotated[int, typer.Option("--doc-tokens", min=64, help="Tokens per document.")] = 2500,
    documents: Annotated[int, typer.Option("--documents", min=1, help="Documents per round.")] = 2,
    questions: Annotated[int, typer.Option("--questions", min=1, max=len(QUESTIONS),
                                           help="Warm questions per document.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds.")] = 2,
    dtypes: Annotated[str, typer.Option("--dtypes", help="Comma list of dtypes to compare.")] = "float32,bfloat16",
    load: Annotated[bool, typer.Option("--load/--no-load", help="Also time model loading cold vs cached.")] = True,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON report here.")] = None,
    lm_weights: Annotated[str, typer.Option("--lm-weights", help="Comma list of prior LM weights to time next to "
                                                                 "the shipped one (first dtype).")] = "",
    core: Annotated[bool, typer.Option("--core/--no-core", help="Cold vs warm, dtypes and model load.")] = True,
    accel: Annotated[bool, typer.Option("--accel/--no-accel", help="SwiftKV and layer skipping vs the full "
                                                                    "model.")] = True,
    accel_dtype: Annotated[str | None, typer.Option("--accel-dtype", help="dtype of the acceleration runs "
                                                                          "(default: the device default).")] = None,
    swiftkv: Annotated[list[str] | None, typer.Option("--swiftkv", help="Distilled SwiftKV parameters to include "
                                                                        "(repeatable; the bundled ones are "
                                                                        "always included).")] = None,
    layer_skip: Annotated[int, typer.Option("--layer-skip", min=0, help="Layers SkipDecode skips at the end of "
                                                                        "the budget (0: leave it out).")] = 6,
    recall_examples: Annotated[int, typer.Option("--recall-examples", min=0, help="NQ evaluation examples for "
                                                                                   "answer recall (0: none).")] = 40,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads (default: torch's).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the acceleration table as "
                                                                     "Markdown here.")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="A PEFT LoRA adapter folder to apply.")] = None,
    many_documents: Annotated[str, typer.Option("--many-documents", help="Comma list of document counts: ground "
                                                "questions in that many documents each, reading all of them vs "
                                                "only those holding the best starts (e.g. 1,5,10,20).")] = "",
    many_questions: Annotated[int, typer.Option("--many-questions", min=1, help="Questions per document count "
                                                                                "(--many-documents).")] = 3,
    plot: Annotated[Path | None, typer.Option("--plot", help="With --many-documents: write its cost curve "
                                                             "(PNG) here.")] = None,
    no_adapter: Annotated[bool, typer.Option("--no-adapter", help="Measure the base model, without the bundled CFIC "
                                                                  "adapter (the bundled SwiftKV parameters were "
                                                                  "distilled for it).")] = False,
) -> None:
    """Measure cold vs warm grounding, decoding overhead, dtypes and model load, and the accelerations (SwiftKV,
    AcrossKV, layer skipping) against the full model, and grounding in many documents, side by side."""
    from cfic.config import adapter_choice
    from cfic.errors import CficError

    names = [d.strip() for d in dtypes.split(",") if d.strip()]
    allowed = ("float32", "bfloat16", "float16")
    if not names or any(d not in allowed for d in names):
        raise CficError(f"--dtypes takes float32, bfloat16 and/or float16, got {dtypes!r}")
    if accel_dtype is not None and accel_dtype not in allowed:
        raise CficError(f"--accel-dtype takes float32, bfloat16 or float16, got {accel_dtype!r}")
    try:
        weights = [float(w) for w in lm_weights.split(",") if w.strip()]
    except ValueError:
        raise CficError(f"--lm-weights takes a comma list of numbers >= 0, got {lm_weights!r}") from None
    if any(not w >= 0 for w in weights):  # also refuses nan
        raise CficError(f"--lm-weights takes a comma list of numbers >= 0, got {lm_weights!r}")
    try:
        counts = [int(c) for c in many_documents.split(",") if c.strip()]
    except ValueError:
        raise CficError(f"--many-documents takes a comma list of positive integers, got {many_documents!r}") from None
    if any(c < 1 for c in counts):
        raise CficError(f"--many-documents takes a comma list of positive integers, got {many_documents!r}")
    if plot is not None and not counts:
        raise CficError("--plot draws the --many-documents curve; give --many-documents")
    if not core and not accel and not counts:
        raise CficError("--no-core and --no-accel leave nothing to measure (add --many-documents)")
    adapter_arg = adapter_choice(adapter, no_adapter)
    for path in swiftkv or []:
        if not Path(path).is_file():
            raise CficError(f"--swiftkv {path}: no such file")
    if threads:
        import torch

        torch.set_num_threads(threads)
    report: dict[str, Any] = {"command": " ".join(["cfic", *sys.argv[1:]])}
    if core:
        report |= run_core_bench(model, doc_tokens, documents, questions, rounds, names, load, adapter_arg,
                                 weights)
    if accel:
        from cfic.bench_accel import run_accel_bench

        report["acceleration"] = run_accel_bench(model, accel_dtype, doc_tokens, documents, questions, rounds,
                                                 list(swiftkv or []), layer_skip, recall_examples, adapter_arg)
    if counts:
        from cfic.bench_many import plot_many_documents, run_many_documents_bench

        report["many_documents"] = run_many_documents_bench(model, counts, many_questions, rounds, adapter_arg)
        if plot is not None:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_many_documents(report["many_documents"], plot)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    if markdown is not None and accel:
        from cfic.bench_accel import accel_markdown

        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(f"Command: `{report['command']}`\n\n" + accel_markdown(report["acceleration"]))
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    if core:
        _print_report(report)
    if accel:
        from cfic.bench_accel import print_accel_report

        print_accel_report(report["acceleration"])
    if counts:
        from cfic.bench_many import print_many_documents_report

        print_many_documents_report(report["many_documents"])

"""The acceleration part of ``cfic bench``: SwiftKV and SkipDecode against the full model, in one run.

Every configuration shares the loaded model and runs interleaved with the others on the same documents and
questions (config A, B, C, A, B, C, ...); times are medians, and speedups are ratios of those medians, so load from
other processes hits every configuration alike. Answer recall is measured on the first examples of the NQ
evaluation split (``cfic.eval``), with the same rule as ``cfic evaluate`` (an answer string inside the evidence).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from cfic.benchmarks.common import (
    QUESTIONS,
    Evidence,
    Timings,
    bench_documents,
    evidence_of,
    matmul_gflops,
    median,
    prefill_flops,
)


@dataclass
class AccelConfig:
    name: str
    grounder: Any
    kind: str  # full | swiftkv-zero | swiftkv-distilled | layer-skip
    layer: int | None = None
    group: int = 1
    layer_skip: int = 0
    source: str | None = None
    timings: Timings = field(default_factory=Timings)
    hits: list[bool] = field(default_factory=list)  # answer recall on evaluation examples
    recall_encode_ms: list[float] = field(default_factory=list)
    recall_evidence: list[Evidence] = field(default_factory=list)


def build_configs(base, swiftkv_files: list[str], layer_skip: int, layers: list[int]) -> tuple[list[AccelConfig],
                                                                                                 list[str]]:
    """The full model, zero-training SwiftKV at ``layers``, each distilled parameter file, and layer skipping (on
    the full model and on the first distilled file). Returns the configs and notes about what was left out."""
    from cfic.decoding.swiftkv import bundled_swiftkv, load_swiftkv
    from cfic.errors import CficError
    from cfic.grounder import Grounder

    loaded = base.loaded
    configs = [AccelConfig("full", base, "full")]
    for layer in layers:
        g = Grounder(loaded, base.config.with_options(swiftkv_layer=layer))
        configs.append(AccelConfig(f"swiftkv-l{layer}-zero", g, "swiftkv-zero", layer))
    notes = []
    files = list(swiftkv_files)
    # "bundled": the file distilled for these weights (with the CFIC adapter merged: its own); else the base model's,
    # which the fingerprint check then leaves out with a note instead of it silently not being tried
    if (bundled_swiftkv(loaded.name) or bundled_swiftkv(loaded.name.split("+")[0])) and "bundled" not in files:
        files.append("bundled")
    distilled = []
    for path in files:
        try:
            sw = load_swiftkv(loaded, path)
        except CficError as exc:
            notes.append(f"distilled parameters left out: {exc}")
            continue
        g = Grounder(loaded, base.config, sw)
        name = f"swiftkv-l{sw.layer}" + (f"-g{sw.group}" if sw.group > 1 else "") + "-distilled"
        if any(c.name == name for c in configs):
            name += f"-{len(configs)}"
        cfg = AccelConfig(name, g, "swiftkv-distilled", sw.layer, sw.group, source=str(path))
        configs.append(cfg)
        distilled.append(cfg)
    if not distilled:
        notes.append("no distilled SwiftKV parameters: run `cfic distill-swiftkv` and pass --swiftkv <file>")
    if layer_skip:
        g = Grounder(loaded, base.config.with_options(layer_skip=layer_skip))
        configs.append(AccelConfig(f"layer-skip-{layer_skip}", g, "layer-skip", layer_skip=layer_skip))
        if distilled:
            d = distilled[0]
            skip = min(layer_skip, d.layer - base.config.layer_skip_warmup)
            g = Grounder(loaded, base.config.with_options(layer_skip=skip), d.grounder.swiftkv)
            configs.append(AccelConfig(f"{d.name}+layer-skip-{skip}", g, "swiftkv-distilled+layer-skip", d.layer,
                                       d.group, skip, d.source))
    return configs, notes


def time_configs(configs: list[AccelConfig], docs: list[str], questions: list[str], rounds: int) -> None:
    """Interleaved: per round and document, every config encodes, answers one cold question, then the warm ones."""
    for _ in range(rounds):
        for d, doc in enumerate(docs):
            encodings = {c.name: c.timings.cold(c.grounder, doc, questions[d % len(questions)]) for c in configs}
            for q in questions:
                for c in configs:
                    c.timings.warm(c.grounder, q, encodings[c.name])


def recall_configs(configs: list[AccelConfig], examples) -> None:
    """Answer recall on evaluation examples; configurations with the same encoding key share one encoding."""
    from cfic.eval.metrics import contains_answer

    for ex in examples:
        encodings: dict[str, Any] = {}
        for c in configs:
            key = c.grounder.model_key
            if key not in encodings:
                t = time.perf_counter()
                encodings[key] = c.grounder.encode(list(ex.documents))
                c.recall_encode_ms.append((time.perf_counter() - t) * 1000)
            res = c.grounder.ground(ex.question, encodings[key])
            text = "\n".join(e.text for e in res.evidence)
            c.hits.append(bool(ex.answers) and contains_answer(text, ex.answers))
            c.recall_evidence.append(evidence_of(res))


def kv_bytes_table(base, layers: list[int], groups=(1, 2, 4)) -> dict[str, int]:
    """KV bytes per cached token of the real model for each SwiftKV layer and AcrossKV group (from an encoding)."""
    from cfic.grounder import Grounder

    text = "A short document. It has two sentences."
    out = {"full": base.encode([text])[0].windows[0].kv.bytes_per_token()}
    for layer in layers:
        for g in groups:
            gr = Grounder(base.loaded, base.config.with_options(swiftkv_layer=layer, swiftkv_group=g))
            out[f"l{layer}-g{g}"] = gr.encode([text])[0].windows[0].kv.bytes_per_token()
    return out


def run_accel_bench(model: str | None, dtype: str | None, doc_tokens: int, n_docs: int, n_questions: int,
                    rounds: int, swiftkv_files: list[str], layer_skip: int, recall_examples: int,
                    adapter: str | None = "auto") -> dict[str, Any]:
    import torch

    from cfic.grounder import Grounder

    base = Grounder.from_pretrained(model, dtype=dtype, adapter=adapter)
    n_layers = base.runner.num_layers
    layers = sorted({n_layers // 2, (2 * n_layers) // 3})
    configs, notes = build_configs(base, swiftkv_files, layer_skip, layers)
    if base.loaded.adapter is None:
        notes.append(f"measured on the base model {base.model_name} without any adapter (--no-adapter or none "
                     "shipped); the bundled SwiftKV parameters were distilled for these weights")
    else:
        notes.append(f"measured with the adapter {base.loaded.adapter} merged ({base.model_name}); SwiftKV "
                     "parameters distilled for other weights are left out (pass --no-adapter to measure the bundled "
                     "ones)")
    report: dict[str, Any] = {"model": base.model_name, "adapter": base.loaded.adapter,
                              "dtype": str(base.loaded.dtype).replace("torch.", ""),
                              "torch_threads": torch.get_num_threads(), "layers": n_layers,
                              "swiftkv_layers_tested": layers, "load_average_start": os.getloadavg(),
                              "notes": notes}
    docs = bench_documents(base.tokenizer, doc_tokens, n_docs)
    questions = QUESTIONS[:n_questions]
    t0 = time.perf_counter()
    time_configs(configs, docs, questions, rounds)
    report["timing_seconds"] = time.perf_counter() - t0
    n_tok = statistics.mean(e.n_tokens for e in base.encode(docs))
    report["doc_tokens"] = n_tok
    peak = matmul_gflops(base.loaded.dtype)
    report["matmul_peak_gflops"] = peak
    full = configs[0]
    full_enc, full_warm = median(full.timings.encode_ms), median(full.timings.warm_ms)
    rows: dict[str, Any] = {}
    for c in configs:
        t = c.timings
        enc, warm, cold = median(t.encode_ms), median(t.warm_ms), median(t.cold_ms)
        paired = [a / b for a, b in zip(full.timings.encode_ms, t.encode_ms, strict=True)]
        same = full.timings.same_evidence_rate(t)
        kv = c.grounder.encode([docs[0][:200]])[0].windows[0].kv.bytes_per_token()
        if c.layer is not None:
            flops = prefill_flops(base.loaded.model, n_tok, layers=c.layer, kv_only_layers=n_layers - c.layer)
        else:
            flops = prefill_flops(base.loaded.model, n_tok)
        gflops = flops / (enc / 1000) / 1e9
        rows[c.name] = {
            "kind": c.kind, "swiftkv_layer": c.layer, "swiftkv_group": c.group, "layer_skip": c.layer_skip,
            "source": c.source, "encode_ms": enc, "encode_speedup": full_enc / enc,
            "encode_speedup_paired_median": statistics.median(paired), "prefill_tokens_per_s": n_tok / (enc / 1000),
            "prefill_gflops": gflops, "share_of_matmul_peak": gflops / peak, "cold_ms": cold, "warm_ms": warm,
            "warm_speedup": full_warm / warm, "warm_over_cold": warm / cold, "prefix_ms": median(t.prefix_ms),
            "skip_ms": median(t.skip_ms), "same_evidence_as_full": same, "kv_bytes_per_token": kv,
        }
    report["configs"] = rows
    report["kv_bytes_per_token"] = kv_bytes_table(base, layers)
    if recall_examples:
        try:
            from cfic.eval import load_split

            examples = load_split("nq", "eval", limit=recall_examples)
        except Exception as exc:  # noqa: BLE001 - the bench still reports speed without the evaluation data
            examples = []
            notes.append(f"answer recall skipped: {type(exc).__name__}: {exc}")
        if examples:
            t0 = time.perf_counter()
            recall_configs(configs, examples)
            report["recall_seconds"] = time.perf_counter() - t0
            ref = full.hits
            for c in configs:
                lost = sum(a and not b for a, b in zip(ref, c.hits, strict=True))
                gained = sum(b and not a for a, b in zip(ref, c.hits, strict=True))
                same = sum(a == b for a, b in zip(full.recall_evidence, c.recall_evidence, strict=True))
                rows[c.name] |= {
                    "answer_recall": sum(c.hits) / len(c.hits), "recall_examples": len(c.hits),
                    "recall_delta_points": 100 * (sum(c.hits) - sum(ref)) / len(ref),
                    "recall_lost": lost, "recall_gained": gained, "same_evidence_as_full_eval": same / len(ref),
                    "eval_encode_ms": median(c.recall_encode_ms),
                }
            for c in configs:
                if c.recall_encode_ms and full.recall_encode_ms:
                    rows[c.name]["eval_encode_speedup"] = median(full.recall_encode_ms) / median(c.recall_encode_ms)
    report["targets"] = _targets(rows, n_layers // 2)
    report["load_average_end"] = os.getloadavg()
    return report


def _targets(rows: dict[str, Any], half: int) -> dict[str, Any]:
    """The issue's targets for the distilled l = L/2 configuration (AcrossKV group 1 preferred)."""
    candidates = [r for r in rows.items() if r[1]["kind"] == "swiftkv-distilled" and r[1]["swiftkv_layer"] == half]
    if not candidates:
        return {"evaluated": False, "reason": f"no distilled parameters at l = {half}"}
    name, row = sorted(candidates, key=lambda r: r[1]["swiftkv_group"])[0]
    out: dict[str, Any] = {"evaluated": True, "config": name, "encode_speedup": row["encode_speedup"],
                           "encode_speedup_target": 1.7, "encode_speedup_met": row["encode_speedup"] >= 1.7}
    if "answer_recall" in row:
        out |= {"recall_delta_points": row["recall_delta_points"], "recall_loss_target_points": 2.0,
                "recall_met": row["recall_delta_points"] >= -2.0, "recall_examples": row["recall_examples"]}
    return out


def print_accel_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170))
    table = Table(title=f"cfic acceleration ({report['model']}, {report['dtype']}, {report['torch_threads']} threads, "
                        f"~{report['doc_tokens']:.0f}-token documents; medians, ratios vs full)")
    cols = ("config", "encode ms", "encode x", "warm ms", "warm x", "warm/cold", "KV B/token", "GFLOP/s (peak %)",
            "answer recall", "Δ pts (lost/gained)")
    for col in cols:
        table.add_column(col, justify="right")
    for name, r in report["configs"].items():
        recall = f"{r['answer_recall']:.1%} (n={r['recall_examples']})" if "answer_recall" in r else "-"
        delta = (f"{r['recall_delta_points']:+.1f} ({r['recall_lost']}/{r['recall_gained']})"
                 if "answer_recall" in r else "-")
        table.add_row(name, f"{r['encode_ms']:.0f}", f"{r['encode_speedup']:.2f}", f"{r['warm_ms']:.0f}",
                      f"{r['warm_speedup']:.2f}", f"{r['warm_over_cold']:.0%}", f"{r['kv_bytes_per_token']:,}",
                      f"{r['prefill_gflops']:.0f} ({r['share_of_matmul_peak']:.0%})", recall, delta)
    console.print(table)
    kv = report["kv_bytes_per_token"]
    console.print("KV bytes per token: " + ", ".join(f"{k} {v:,}" for k, v in kv.items()))
    console.print(f"matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s; load average "
                  f"{report['load_average_start'][0]:.1f} -> {report['load_average_end'][0]:.1f}")
    t = report["targets"]
    if t.get("evaluated"):
        line = f"target {t['config']}: encode {t['encode_speedup']:.2f}x (>= 1.7: {t['encode_speedup_met']})"
        if "recall_delta_points" in t:
            line += f", recall {t['recall_delta_points']:+.1f} pts (>= -2: {t['recall_met']}, n={t['recall_examples']})"
        console.print(line)
    for note in report["notes"]:
        console.print(f"[yellow]note[/yellow]: {note}")


def accel_markdown(report: dict[str, Any]) -> str:
    """The acceleration table as Markdown (for BENCHMARKS.md)."""
    adapter = report.get("adapter")
    weights = f"adapter {adapter} merged" if adapter else "base weights, no adapter"
    lines = [f"Model {report['model']} ({weights}), "
             f"{report['dtype']}, {report['torch_threads']} torch threads, "
             f"~{report['doc_tokens']:.0f}-token documents; medians of interleaved runs; ratios against `full`. "
             f"Load average {report['load_average_start'][0]:.1f} at the start, {report['load_average_end'][0]:.1f} "
             "at the end.", "",
             "| config | encode ms | encode speedup | warm query ms | warm speedup | warm/cold | KV bytes/token | "
             "prefill GFLOP/s (share of matmul peak) | answer recall | Δ recall, points (lost/gained) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["configs"].items():
        recall = f"{r['answer_recall']:.1%} (n={r['recall_examples']})" if "answer_recall" in r else "-"
        delta = (f"{r['recall_delta_points']:+.1f} ({r['recall_lost']}/{r['recall_gained']})"
                 if "answer_recall" in r else "-")
        lines.append(f"| {name} | {r['encode_ms']:.0f} | {r['encode_speedup']:.2f}x | {r['warm_ms']:.0f} | "
                     f"{r['warm_speedup']:.2f}x | {r['warm_over_cold']:.0%} | {r['kv_bytes_per_token']:,} | "
                     f"{r['prefill_gflops']:.0f} ({r['share_of_matmul_peak']:.0%}) | {recall} | {delta} |")
    kv = report["kv_bytes_per_token"]
    lines += ["", "KV bytes per cached token (AcrossKV group g at SwiftKV layer l): "
              + ", ".join(f"{k} {v:,}" for k, v in kv.items()) + ".",
              f"Matrix-multiply peak measured in the same run: {report['matmul_peak_gflops']:.0f} GFLOP/s."]
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"

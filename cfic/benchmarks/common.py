"""What the benchmark parts share: the questions and documents they time, the timing record, FLOP counts.

Kept apart from every part so that the parts never import each other (the core and acceleration benchmarks used to
import one another for these).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

QUESTIONS = [
    "When did William of Normandy conquer England?",
    "Who was the Norse leader who founded Normandy?",
    "What language did the Normans speak?",
    "In which century did the Normans gain their separate identity?",
    "Which island did the Normans conquer in the Mediterranean?",
    "What was the name of the Norman architecture style?",
]

Evidence = list[tuple[int, int, int]]


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


def evidence_of(result: Any) -> Evidence:
    """A grounding result's evidence as comparable (document, start, end) triples."""
    return [(e.document_index, e.start_char, e.end_char) for e in result.evidence]


def median(xs: list[float]) -> float | None:
    """The median, or None for no measurements (a configuration that was not run)."""
    return statistics.median(xs) if xs else None


@dataclass
class Timings:
    """One configuration's measurements: a cold query per document (encode + ground), then warm queries on the
    stored encoding, with the evidence of each warm query (to compare configurations' answers)."""

    encode_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)  # the LM's prefill alone (encode = plan + read)
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    prefix_ms: list[float] = field(default_factory=list)
    skip_ms: list[float] = field(default_factory=list)
    reading_ms: list[float] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)

    def cold(self, grounder: Any, document: str, question: str) -> Any:
        """Encode ``document`` and answer ``question`` on it; returns the encoding for the warm queries."""
        t = time.perf_counter()
        plans = grounder.plan([document])
        t_read = time.perf_counter()
        encoding = grounder.read(plans)
        done = time.perf_counter()
        encode_ms = (done - t) * 1000
        result = grounder.ground(question, encoding)
        self.encode_ms.append(encode_ms)
        self.read_ms.append((done - t_read) * 1000)
        self.cold_ms.append(encode_ms + result.usage.latency_ms)
        return encoding

    def warm(self, grounder: Any, question: str, encoding: Any) -> None:
        result = grounder.ground(question, encoding)
        self.warm_ms.append(result.usage.latency_ms)
        self.prefix_ms.append(result.usage.prefix_ms)
        self.skip_ms.append(result.usage.skip_ms)
        self.reading_ms.append(result.usage.reading_ms)
        self.evidence.append(evidence_of(result))

    def same_evidence_rate(self, other: Timings) -> float:
        """Share of the warm queries on which ``other`` returned exactly the same evidence."""
        return sum(x == y for x, y in zip(self.evidence, other.evidence, strict=True)) / max(1, len(self.evidence))


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


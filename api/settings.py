"""Service settings: one typed object handed to ``create_app``, so limits and queue sizes are never module
globals.

Kept free of heavy imports (no torch, no FastAPI) so the CLI can parse its options before loading anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cfic.errors import CficError, require_positive_int

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def parse_size(value: str | int) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1000000"`` -> bytes. Operators think in MiB/GiB, not in raw byte counts."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise CficError(f"a size must be >= 0, got {value}")
        return value
    match = _SIZE.match(str(value))
    if not match or (match.group(2) or "").lower() not in _UNITS:
        raise CficError(f"not a size: {value!r} (use e.g. 1048576, 512MiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


# ------------------------------------------------------------------------------------------ default limits
# The defaults bound one request to what the model worker can do within the default timeout, so that a request the
# server admits is also one it can answer. Measured on this project's reference machine (2 CPU cores, the default
# SmolLM2-135M with the CFIC adapter, float32, while another job kept both cores busy; tokens per second of prefill
# over one window):
#
#     window tokens        1,024   2,048   4,096
#     prefill tok/s          165     155     120      (1 torch thread; 2 threads on the busy cores: ~100)
#
# and the grounding of each window (question pass, prefix search, one teacher-forced skip-decoding pass of up to
# ``top_k`` x ``max_span_tokens`` tokens) costs seconds on top (a 1,900-token window: 0.7 s prefix search + 4.4 s
# skip decoding). Budget at ~150 tok/s for the 60 s default timeout:
#
#   - ``max_total_chars`` 12,000 characters of documents per request: ~3,600 tokens at the 3.3 characters per token
#     of markdown/code-heavy English (prose runs ~4), ~25 s of prefill. Measured: one 12,000-character document
#     (README.md, 3,568 tokens) took 40 s in all (27 s prefill, 0.8 s prefix search, 12.6 s skip decoding); one of
#     14,400 characters (4,381 tokens) already took 74 s (35 s + 38 s), past the timeout;
#   - ``max_documents`` 4: every document is at least one window, and every window costs its own prompt head and
#     grounding passes (~3-5 s), so 4 documents of 3,000 characters come to roughly the same ~45 s;
#
# leaving some room for the queue wait and a slower moment of the machine. The previous defaults (16 documents of
# 100,000 characters each) admitted ~20 minutes of prefill into a 60 s timeout. Text that tokenises far more densely
# than English (CJK, emoji, random strings: up to ~1 token per character) can still exceed the budget; such a
# request gets its 504 and its model work is stopped within one prefill pass
# (``cfic.decoding.encode.PREFILL_CHUNK_TOKENS``) or one window's grounding, so it cannot hold the worker for long.
# (Known exception: a window's skip decoding grows quadratically with verbatim-repeated sentences -- one candidate
# per occurrence, ``cfic.decoding.skip.candidates`` -- and cannot be interrupted.) Operators with faster hardware
# (or a GPU) raise the limits together with ``--timeout``.
DEFAULT_MAX_DOCUMENTS = 4
DEFAULT_MAX_TOTAL_CHARS = 12_000
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and capacities of one server instance.

    ``max_request_bytes``, ``max_documents``, ``max_document_chars`` and ``max_total_chars`` (characters of all
    documents together) bound what one request may ask of the model (413 beyond them); see the note above for how
    the defaults follow from the model's measured speed. ``max_queue`` bounds the requests waiting for the model
    worker (503 + Retry-After beyond it), ``max_batch`` how many waiting requests one worker turn takes together.
    ``timeout_s`` is measured from arrival, queue wait included (504 beyond it; the request's model work is
    stopped too). ``cache_bytes`` bounds the document-encoding cache by KV memory. ``api_key``: when set,
    ``Authorization: Bearer <key>`` is required on the data endpoints; never printed (``repr=False``) so a logged
    settings object cannot leak it."""

    max_request_bytes: int = 2 * 1024 * 1024
    max_documents: int = DEFAULT_MAX_DOCUMENTS
    max_document_chars: int = DEFAULT_MAX_TOTAL_CHARS
    max_total_chars: int = DEFAULT_MAX_TOTAL_CHARS
    max_query_chars: int = 4_000
    max_queue: int = 32
    max_batch: int = 8
    timeout_s: float = DEFAULT_TIMEOUT_S
    cache_bytes: int = 1024**3
    index_top_documents: int = 3
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_documents", "max_document_chars", "max_total_chars",
                     "max_query_chars", "max_queue", "max_batch", "index_top_documents"):
            require_positive_int(name, getattr(self, name))
        if self.max_document_chars > self.max_total_chars:
            raise CficError(f"max_document_chars ({self.max_document_chars}) exceeds max_total_chars "
                            f"({self.max_total_chars}), the characters all documents of a request may have together: "
                            "raise both (the timeout too: see cfic.api.settings)")
        if not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise CficError(f"cache_bytes must be >= 0, got {self.cache_bytes!r}")
        if not self.timeout_s > 0:
            raise CficError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise CficError("the API key is empty")

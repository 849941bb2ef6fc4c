"""Service settings: one typed object handed to ``create_app``, so limits and queue sizes are never module
globals.

Kept free of heavy imports (no torch, no FastAPI) so the CLI can parse its options before loading anything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cfic.errors import CficError

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


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and capacities of one server instance.

    ``max_request_bytes``, ``max_documents`` and ``max_document_chars`` bound what one request may ask of the
    model (413 beyond them). ``max_queue`` bounds the requests waiting for the model worker (503 + Retry-After
    beyond it), ``max_batch`` how many waiting requests one worker turn takes together. ``timeout_s`` is
    measured from arrival, queue wait included (504 beyond it). ``cache_bytes`` bounds the document-encoding
    cache by KV memory. ``api_key``: when set, ``Authorization: Bearer <key>`` is required on the data
    endpoints; never printed (``repr=False``) so a logged settings object cannot leak it."""

    max_request_bytes: int = 2 * 1024 * 1024
    max_documents: int = 16
    max_document_chars: int = 100_000
    max_query_chars: int = 4_000
    max_queue: int = 32
    max_batch: int = 8
    timeout_s: float = 60.0
    cache_bytes: int = 1024**3
    index_top_documents: int = 3
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_documents", "max_document_chars", "max_query_chars",
                     "max_queue", "max_batch", "index_top_documents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CficError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise CficError(f"cache_bytes must be >= 0, got {self.cache_bytes!r}")
        if not self.timeout_s > 0:
            raise CficError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise CficError("the API key is empty")

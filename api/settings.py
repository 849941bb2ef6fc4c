"""Service settings: one typed object handed to ``create_app``, so limits and queue sizes are never module
globals.

pydantic-settings, so every limit is declared once with its type and bounds and can also come from the
environment (``CFIC_SERVE_MAX_DOCUMENTS=8``, ``CFIC_SERVE_TIMEOUT_S=120``, ...; arguments win); sizes are parsed
by pydantic's ``ByteSize`` ("512MiB", "2GB") rather than by hand; a bad value comes back as one ``CficError``
naming the setting (the CLI prints it as ``error: ...`` and exits 2; never a traceback). Kept free of heavy
imports (no torch, no FastAPI) so the CLI can parse its options before loading anything."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ByteSize,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cfic.errors import CficError

_SIZE_HELP = "use e.g. 1048576, 512MiB, 2GB"
_BARE_UNIT = re.compile(r"(?i)(?<=[\d\s.])([kmgt]i?)\s*$")  # "10k", "512Mi": ByteSize wants "10kb", "512MiB"


def _size_input(value: Any) -> Any:
    """Operators type "10k" or "2Gi"; ``ByteSize`` only knows units that end in "b" (and takes True for 1)."""
    if isinstance(value, bool):
        raise ValueError("a flag is not a size")
    return _BARE_UNIT.sub(r"\1b", value) if isinstance(value, str) else value


# A byte count: an int, or a number with a decimal (kB, MB, ...) or binary (KiB, MiB, ...) unit.
Size = Annotated[ByteSize, BeforeValidator(_size_input), Field(ge=0)]
def _count_input(value: Any) -> Any:
    """A whole number (from the environment, its digits); True where a count belongs is a mistake."""
    if isinstance(value, bool):
        raise ValueError("a flag is not a count")
    return value


Count = Annotated[int, BeforeValidator(_count_input), Field(ge=1)]
_SIZE = TypeAdapter(Size)


def parse_size(value: str | int) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1000000"`` -> bytes. Operators think in MiB/GiB, not in raw byte counts."""
    try:
        return int(_SIZE.validate_python(value))
    except ValidationError:
        raise CficError(f"not a size: {value!r} ({_SIZE_HELP})") from None


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


class ServiceSettings(BaseSettings):
    """Limits and capacities of one server instance.

    ``max_request_bytes``, ``max_documents``, ``max_document_chars`` and ``max_total_chars`` (characters of all
    documents together) bound what one request may ask of the model (413 beyond them); see the note above for how
    the defaults follow from the model's measured speed. ``max_queue`` bounds the requests waiting for the model
    worker (503 + Retry-After beyond it), ``max_batch`` how many waiting requests one worker turn takes together.
    ``timeout_s`` is measured from arrival, queue wait included (504 beyond it; the request's model work is
    stopped too). ``cache_bytes`` bounds the document-encoding cache by KV memory (0 disables it). ``api_key``:
    when set, ``Authorization: Bearer <key>`` is required on the data endpoints; never printed (``repr=False``,
    and left out of error messages) so a logged settings object cannot leak it."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="CFIC_SERVE_")

    max_request_bytes: Annotated[Size, Field(gt=0)] = ByteSize(2 * 1024**2)
    max_documents: Count = DEFAULT_MAX_DOCUMENTS
    max_document_chars: Count = DEFAULT_MAX_TOTAL_CHARS
    max_total_chars: Count = DEFAULT_MAX_TOTAL_CHARS
    max_query_chars: Count = 4_000
    max_queue: Count = 32
    max_batch: Count = 8
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = DEFAULT_TIMEOUT_S
    cache_bytes: Size = ByteSize(1024**3)
    index_top_documents: Count = 3
    api_key: str | None = Field(default=None, repr=False)

    def __init__(self, **values: Any) -> None:
        # pydantic's ValidationError lists every problem with a traceback-like layout; callers (the CLI, tests)
        # expect cfic's one-line CficError for bad configuration.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise CficError(_explain(exc)) from None

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the API key is empty")
        return value

    @model_validator(mode="after")
    def _document_fits_total(self) -> ServiceSettings:
        if self.max_document_chars > self.max_total_chars:
            raise ValueError(f"max_document_chars ({self.max_document_chars}) exceeds max_total_chars "
                             f"({self.max_total_chars}), the characters all documents of a request may have "
                             "together: raise both (the timeout too: see cfic.api.settings)")
        return self


_SIZE_FIELDS = frozenset({"max_request_bytes", "cache_bytes"})


def _explain(exc: ValidationError) -> str:
    """One line per problem, naming the setting and the value (never the API key's)."""
    problems = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(p) for p in error["loc"])
        if error["type"] == "value_error" and name not in _SIZE_FIELDS:  # our own validators' messages say it all
            message = str(error["ctx"]["error"])
            problems.append(message if not name or name in message else f"{name}: {message}")
        elif name == "api_key":  # never echoed
            problems.append(f"api_key: {error['msg']}")
        elif name in _SIZE_FIELDS and error["type"] != "greater_than":  # "greater_than": max_request_bytes=0
            problems.append(f"{name}: not a size: {error['input']!r} ({_SIZE_HELP})")
        else:
            problems.append(f"{name}: {error['msg']}, got {error['input']!r}")
    return "invalid server settings: " + "; ".join(problems)

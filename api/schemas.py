"""Request and response models of the REST service; the OpenAPI schema and ``/docs`` are generated from them.

The response mirrors ``cfic ground --json`` (``GroundingResult.to_dict()``) so a client can switch between the
CLI and the service without changing its parser; the service adds ``request_id`` and a few usage fields.

The request model is built per server (``build_request_model``) so that the published schema tells the truth
about that server: its size limits appear as ``maxItems``/``maxLength``, ``documents`` is required unless the
server has an index, and ``max_span_tokens`` starts at the grounder's sentence cap. The app answers a broken
size limit with 413 (too large is a different remedy for the client than malformed, 422).

Validation is strict, one policy for every field: numbers must be JSON numbers and strings JSON strings
(``"0.5"`` is not a threshold, ``"3"`` is not a ``top_k``, ``true`` is neither); the only conversion is the one
JSON Schema itself makes, a whole float such as ``2.0`` is an ``integer``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

MAX_TOP_K = 32
MAX_SPAN_TOKENS = 4096
MAX_ID_CHARS = 256
MAX_INDEX_DOCUMENTS = 100

OFFSETS_NOTE = (
    "Offsets are half-open indices in Unicode code points (as Python string indices, not bytes and not "
    "UTF-16 units): `text == documents[document_index].text[start_char:end_char]` always holds."
)


def _no_lone_surrogates(value: str | None) -> str | None:
    # A lone surrogate is not text, and tokenizers cannot encode it. (JSON bodies are already checked by the
    # parser; this covers models built from Python.)
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("contains an unpaired UTF-16 surrogate (not valid Unicode text)") from exc
    return value


def _not_blank(value: str | None) -> str | None:
    # Refused here, not by the core: the core only finds out after the document's prefill, seconds of model time
    # that a client sending blanks would get for free.
    if value is not None and not value.strip():
        raise ValueError("must contain a non-whitespace character")
    return value


def _whole_number(value: Any) -> Any:
    """JSON Schema's ``integer`` includes 2.0; booleans and numeric strings are not numbers, so they are
    refused."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole_number(minimum: int, maximum: int) -> Any:
    """An integer type bounded to [minimum, maximum] (bounds inside the type, so the JSON schema shows them)."""
    return Annotated[int, Field(ge=minimum, le=maximum), BeforeValidator(_whole_number)]


class DocumentIn(BaseModel):
    """One document, read whole by the model (never chunked)."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"id": "normans", "text": "The Normans conquered England in 1066. "
                                         "They built many castles.", "metadata": {"source": "history.txt"}}]},
    )

    id: str | None = Field(
        default=None, max_length=MAX_ID_CHARS,
        description="Returned as `document_id` in evidence; defaults to the document's position "
                    "(\"0\", \"1\", ...).",
    )
    text: str = Field(
        min_length=1,
        description="The document text, read whole. A whitespace-only text is rejected (422).",
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form; kept with the document.")

    @field_validator("id", "text")
    @classmethod
    def _valid_unicode(cls, value: str | None) -> str | None:
        return _no_lone_surrogates(value)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        return _not_blank(value)


class GroundRequest(BaseModel):
    """A question and the documents to find verbatim evidence in."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{
            "query": "When did the Normans conquer England?",
            "documents": [{"id": "normans", "text": "The Normans conquered England in 1066. They built many "
                                                    "castles."}],
            "top_k": 3,
        }]},
    )

    query: str = Field(min_length=1, description="The question. A whitespace-only query is rejected (422).")
    documents: list[DocumentIn] = Field(min_length=1, description="Documents to ground in.")
    top_k: whole_number(1, MAX_TOP_K) | None = Field(
        default=None,
        description="Prefixes kept by the constrained prefix search, and evidence spans returned at most "
                    "(default: the server's configuration, usually 3).",
    )
    max_span_tokens: whole_number(1, MAX_SPAN_TOKENS) | None = Field(
        default=None,
        description="Skip-decoding budget: an evidence span never runs past this many tokens. It cannot be "
                    "below the grounder's sentence cap (`max_sentence_tokens`).",
    )
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Spans scoring below it are dropped; when none remain the response says `no_evidence`.",
    )
    use_attention: bool = Field(
        default=True,
        description="Rank start sentences by the sentence prior fused with the LM's attention (the default); "
                    "`false`: by the prior alone (better on one long single-topic article, BENCHMARKS.md round 6).",
    )
    hops: whole_number(1, 2) = Field(
        default=1,
        description="2: search a second time with the first evidence in the question (multi-hop questions; reads "
                    "every document sent).",
    )
    abstain: bool | None = Field(
        default=None,
        description="Act on the abstention model: answer `no_evidence` with no spans when its P(no evidence) is "
                    "above its fitted threshold. Default: as the model's settings say (the bundled model ships "
                    "with abstention off, because it costs answers; `no_evidence_probability` is reported either "
                    "way).",
    )

    @field_validator("query")
    @classmethod
    def _valid_unicode(cls, value: str) -> str:
        return _not_blank(_no_lone_surrogates(value))


# Validation errors that mean "over this server's size limit" (answered 413), by error type and location.
SIZE_LIMIT_ERRORS = frozenset({"too_long", "string_too_long"})


def is_size_limit_error(error_type: str, loc: tuple | list) -> bool:
    """``loc`` as FastAPI reports it: ``("body", "documents", 0, "text")``."""
    if error_type not in SIZE_LIMIT_ERRORS or len(loc) < 2 or loc[0] != "body":
        return False
    rest = tuple(loc[1:])
    if rest in (("query",), ("documents",)):
        return True
    return len(rest) == 3 and rest[0] == "documents" and rest[2] == "text"


def build_request_model(
    *,
    max_documents: int,
    max_document_chars: int,
    max_query_chars: int,
    has_index: bool,
    max_total_chars: int | None = None,
    min_span_tokens: int = 1,
    max_span_tokens: int = MAX_SPAN_TOKENS,
) -> type[GroundRequest]:
    """The ``GroundRequest`` of one server, with its limits in the schema.

    ``min_span_tokens``/``max_span_tokens``: the grounder's sentence cap and its own span budget. Documents are
    cut into windows planned for the grounder's budget, so a request may lower it but not raise it."""
    document = create_model(
        "DocumentIn", __base__=DocumentIn, __module__=__name__,
        text=(str, Field(min_length=1, max_length=max_document_chars,
                         description=f"The document text, read whole: at most {max_document_chars} characters "
                                     "on this server (413 beyond). A whitespace-only text is rejected (422).")),
    )
    total = f", {max_total_chars} characters in all" if max_total_chars is not None else ""
    docs_help = f"Documents to ground in: at most {max_documents} per request{total} on this server (413 beyond)."
    fields: dict[str, Any] = {
        "query": (str, Field(min_length=1, max_length=max_query_chars,
                             description=f"The question: at most {max_query_chars} characters (413 "
                                         "beyond).")),
        "max_span_tokens": (whole_number(min(min_span_tokens, max_span_tokens), max_span_tokens) | None, Field(
            default=None,
            description="Skip-decoding budget: an evidence span never runs past this many tokens (default and "
                        f"maximum on this server: {max_span_tokens}; at least the sentence cap, "
                        f"{min(min_span_tokens, max_span_tokens)}).")),
    }
    if has_index:
        fields["documents"] = (list[document] | None, Field(  # type: ignore[valid-type]
            default=None, min_length=1, max_length=max_documents,
            description=docs_help + " Omit them to ground in the documents this server's index finds for the "
                                    "query."))
        fields["top_documents"] = (whole_number(1, min(max_documents, MAX_INDEX_DOCUMENTS)) | None, Field(
            default=None,
            description="When `documents` is omitted: how many documents to take from the index."))
    else:
        fields["documents"] = (list[document], Field(  # type: ignore[valid-type]
            min_length=1, max_length=max_documents,
            description=docs_help + " Required: this server has no index."))
    return create_model("GroundRequest", __base__=GroundRequest, __module__=__name__, **fields)


class EvidenceOut(BaseModel):
    """A verbatim span of whole sentences (offsets: see ``OFFSETS_NOTE``)."""

    model_config = ConfigDict(json_schema_extra={"description": "A verbatim span of whole sentences. "
                                                                + OFFSETS_NOTE})

    document_index: int = Field(description="Index into the request's `documents` (or the response's "
                                            "`documents` when they came from the index).")
    document_id: str
    start_char: int = Field(description="Half-open start, in code points.")
    end_char: int = Field(description="Half-open end, in code points.")
    text: str = Field(description="Exactly `documents[document_index].text[start_char:end_char]`.")
    score: float = Field(description="Geometric-mean probability of the prefix that picked the start "
                                     "sentence, 0..1.")
    sentence_start: int = Field(description="First sentence of the span (index into the document's "
                                            "sentences).")
    sentence_end: int = Field(description="One past the last sentence of the span.")
    end_probability: float = Field(description="The model's end-of-evidence probability where the span ends.")


class StagesOut(BaseModel):
    """Where the time went (as ``stages_ms`` in ``cfic ground --json``, plus the queue wait)."""

    queue_ms: float = Field(description="Waiting for the model worker.")
    encode_ms: float = Field(description="Document prefill spent for this request (0 on a cache hit).")
    reading_ms: float = Field(0.0, description="The LM reading the prior's best paragraphs with the question "
                                               "(paragraph question likelihood).")
    prefix_ms: float = Field(description="Constrained prefix search.")
    skip_ms: float = Field(description="Skip decoding (where each span ends).")


class UsageOut(BaseModel):
    """What the request cost. `cached_tokens` > 0 means document prefill was skipped thanks to the encoding
    cache."""

    input_tokens: int = Field(description="Tokens the model read for this request: documents plus question.")
    cached_tokens: int = Field(description="Document tokens whose encoding was reused instead of recomputed "
                                           "(from the server's cache or from another request in the same "
                                           "batch).")
    latency_ms: float = Field(description="Server time from arrival to response, queue wait included.")
    stages_ms: StagesOut


class RetrievedDocument(BaseModel):
    """A document the index supplied (only when the request omitted `documents`)."""

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    score: float | None = Field(default=None, description="The index's retrieval score.")


class GroundResponse(BaseModel):
    """The evidence schema of ``cfic ground --json`` plus ``request_id`` (and ``documents`` from the index).
    """

    model_config = ConfigDict(json_schema_extra={"description": (
        "The same evidence schema as `cfic ground --json`, plus `request_id` (and `documents` when the index "
        "supplied them). " + OFFSETS_NOTE)})

    request_id: str
    query: str
    model: str
    evidence: list[EvidenceOut]
    no_evidence: bool = Field(description="True when the abstention model judged that nothing in the documents "
                                          "answers the query, or no span passed the threshold (not an error).")
    no_evidence_probability: float | None = Field(
        default=None, description="The abstention model's probability that nothing answers the query (null when "
                                  "the model has no abstention settings).")
    usage: UsageOut
    documents: list[RetrievedDocument] | None = Field(
        default=None, description="The documents `document_index` refers to, when they came from the index.")


class ErrorResponse(BaseModel):
    """Every error is JSON with a stable machine-readable `error` code and a human `message`."""

    error: str = Field(description="A stable code: bad_request, unauthorized, payload_too_large, "
                                   "unsupported_media_type, invalid_request, overloaded, timeout, not_found, ...")
    message: str
    request_id: str
    details: list[dict[str, Any]] | None = Field(default=None, description="Per-field validation problems.")


class HealthResponse(BaseModel):
    status: str = Field(description="`ok` while the process serves HTTP.")


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready` once the model is loaded, else `loading` or `failed`.")
    model: str | None = None
    index_documents: int | None = Field(default=None, description="Documents in the index, when one is "
                                                                  "loaded.")
    detail: str | None = None


class StatsResponse(BaseModel):
    """Counters for operators and the load test."""

    queue_depth: int
    max_queue: int
    processed: int
    rejected: int
    timed_out: int
    skipped: int
    cancelled: int = Field(description="Requests whose model work was stopped when they timed out or their client "
                                       "left.")
    batches: int
    max_batch_seen: int
    cache: dict[str, int]

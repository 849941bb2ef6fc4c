"""Prompt layout and whole-document encoding.

The prompt is ``[head][document][question part]`` and the answer follows it: the document comes *before* the
question, so a document's KV cache is a prefix that any number of questions can reuse. Each piece is tokenised on
its own and the ids concatenated, always the same way (at inference and in training), so the document tokens do not
depend on the question.

The document is tokenised sentence segment by sentence segment (segment i = the text between sentence i-1's end
and sentence i's end), which makes every sentence's token span exact by construction. A document longer than the
model's context is the one place where cfic cuts a document: into windows of whole sentences that overlap by at
least ``overlap_tokens`` tokens, so every span that fits the skip-decoding budget lies whole inside some window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from cfic.config import GroundingConfig
from cfic.decoding.attention import QueryUpdate, SentenceAttention, SentenceAttentionTap, sentence_token_bounds
from cfic.decoding.runner import KVCache, LayerRunner, prefill
from cfic.decoding.trie import SentenceTrie
from cfic.errors import (
    CficError,
    EmptyDocumentError,
    EmptyQueryError,
    GroundingCancelled,
    QueryTooLongError,
    require_positive_int,
)
from cfic.text import Sentence, split_sentences

_DOC, _QUERY = "\u2063CFIC_DOCUMENT\u2063", "\u2063CFIC_QUESTION\u2063"


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the document, and how the question part is tokenised."""

    head_ids: tuple[int, ...]
    between: str  # text between the document and the question
    tail: str  # text between the question and the answer
    eos_ids: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer, instruction: str, eos_ids: Sequence[int]) -> PromptTemplate:
        user = f"{instruction}\n\nDocument:\n{_DOC}\n\nQuestion: {_QUERY}"
        text = None
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
                )
            except Exception:  # noqa: BLE001 - any template failure falls back to the plain layout
                text = None
        if text and _DOC in text and _QUERY in text and text.index(_DOC) < text.index(_QUERY):
            head, rest = text.split(_DOC, 1)
            between, tail = rest.split(_QUERY, 1)
            head_ids = tuple(tokenizer(head, add_special_tokens=False)["input_ids"])
        else:
            head, between, tail = f"{instruction}\n\nDocument:\n", "\n\nQuestion: ", "\nEvidence:\n"
            head_ids = tuple(tokenizer(head, add_special_tokens=True)["input_ids"])
        eos = set(eos_ids)  # cfic.models.eos_token_ids: the generation config's and the tokenizer's
        if not eos:
            raise CficError("the tokenizer has no end-of-sequence token; cfic needs one to end evidence")
        return cls(head_ids, between, tail, tuple(sorted(eos)))

    def query_ids(self, tokenizer, query: str, max_query_tokens: int) -> list[int]:
        if not query or not query.strip():
            raise EmptyQueryError("the query is empty")
        n_query = len(tokenizer(query, add_special_tokens=False)["input_ids"])
        if n_query > max_query_tokens:
            raise QueryTooLongError(
                f"the query has {n_query} tokens; at most {max_query_tokens} fit next to a document "
                "(raise max_query_tokens)"
            )
        return list(tokenizer(self.between + query + self.tail, add_special_tokens=False)["input_ids"])

    def overhead(self, tokenizer, max_query_tokens: int) -> int:
        """Tokens a question part can take at most (question text plus the fixed text around it)."""
        fixed = len(tokenizer(self.between + self.tail, add_special_tokens=False)["input_ids"])
        return fixed + max_query_tokens + 4  # +4: merges at the joins can only shorten, never lengthen by more


@dataclass(frozen=True)
class EncodedWindow:
    """Sentences ``[first, last)`` of a document after the prompt head, with their KV cache."""

    first: int
    last: int
    n_tokens: int  # head + document tokens; the KV cache length
    kv: KVCache
    trie: SentenceTrie


@dataclass(frozen=True)
class SplitDocument:
    """A document split into sentences and tokenised (what planning and encoding have in common).

    ``answer_ids[i]``: sentence i tokenised as the model emits it at the start of an answer (the trie's paths);
    ``segment_ids[i]``: the document text between sentence i-1's end and sentence i's end, as in the document (what
    follows a sentence when the evidence continues).
    """

    document_id: str
    text: str
    metadata: dict[str, Any]
    sentences: tuple[Sentence, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    segment_ids: tuple[tuple[int, ...], ...]

    @property
    def n_tokens(self) -> int:
        """Document tokens (without the prompt head), counted once even where windows overlap."""
        return sum(len(s) for s in self.segment_ids)


@dataclass(frozen=True)
class DocumentEncoding(SplitDocument):
    """A document read once by the model: reusable for any number of questions. Never mutated after building."""

    windows: tuple[EncodedWindow, ...]
    model_key: str
    features: Any = None  # cfic.prior.SentenceFeatures when the grounder uses a sentence prior

    @property
    def nbytes(self) -> int:
        return sum(w.kv.nbytes() for w in self.windows) + (self.features.nbytes if self.features is not None else 0)


@dataclass(frozen=True)
class DocumentPlan(SplitDocument):
    """A document split and tokenised, not yet read by the model (``windows``: sentence ranges; ``features``: the
    sentence prior's, when used). Planning is cheap; reading (the prefill) is the cost, so a grounder can plan many
    documents and read only those it needs."""

    windows: tuple[tuple[int, int], ...]
    features: Any = None

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.segment_ids)


def window_bounds(lengths: Sequence[int], capacity: int, overlap: int) -> list[tuple[int, int]]:
    """Cut sentences (token lengths ``lengths``) into windows of at most ``capacity`` tokens of whole sentences.

    Consecutive windows overlap by at least ``overlap`` tokens (whole sentences) when the window capacity allows,
    so any run of sentences of at most ``overlap`` tokens lies whole inside one window.
    """
    if any(n > capacity for n in lengths):
        raise CficError(f"a sentence has more tokens than a window can hold ({capacity}); lower max_sentence_tokens")
    windows: list[tuple[int, int]] = []
    start, n = 0, len(lengths)
    while start < n:
        end, used = start, 0
        while end < n and used + lengths[end] <= capacity:
            used += lengths[end]
            end += 1
        windows.append((start, end))
        if end >= n:
            break
        nxt, back = end, 0
        while nxt - 1 > start and back < overlap:
            nxt -= 1
            back += lengths[nxt]
        start = nxt
    return windows


def plan_document(
    tokenizer,
    template: PromptTemplate,
    text: str,
    document_id: str,
    metadata: dict[str, Any],
    config: GroundingConfig,
    max_context: int,
) -> DocumentPlan:
    if not isinstance(text, str):
        raise CficError(f"document {document_id!r}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise EmptyDocumentError(f"document {document_id!r} is empty or whitespace only")

    def count(texts: Sequence[str]) -> list[int]:
        return [len(x) for x in _ids(tokenizer, texts)]

    sentences = tuple(
        split_sentences(text, language=config.language, max_tokens=config.max_sentence_tokens, count_tokens=count)
    )
    bounds = [0, *(s.end for s in sentences[:-1])]
    segments = [text[a: s.end] for a, s in zip(bounds, sentences, strict=True)]
    segment_ids = tuple(tuple(x) for x in _ids(tokenizer, segments))
    answer_ids = tuple(tuple(x) for x in _ids(tokenizer, [s.text for s in sentences]))
    capacity = (max_context - len(template.head_ids) - template.overhead(tokenizer, config.max_query_tokens)
                - config.max_span_tokens - config.max_prefix_tokens - config.top_k)
    if capacity < config.max_span_tokens:
        raise CficError(
            f"the model's context ({max_context} tokens) leaves only {capacity} tokens for a document window; "
            "lower max_query_tokens or max_span_tokens"
        )
    windows = window_bounds([len(s) for s in segment_ids], capacity, config.overlap_tokens)
    return DocumentPlan(document_id, text, dict(metadata), sentences, answer_ids, segment_ids, tuple(windows))


# Tokens per prefill pass (all rows of a batch together). A window can hold thousands of tokens, and one pass over
# it takes up to a minute on a CPU (the default model's 8k context at ~120-160 tokens/s on the 2 cores of the
# reference machine while they were busy); cut into passes of this size, an abandoned request (deadline passed,
# client gone) frees the model within one pass (~3 s there) instead of at the end of the window. Large enough that
# the passes stay matrix-sized: on the default model (1 thread) a 2,048-token window took 13.1 s in passes of 512
# and 12.7-13.7 s in passes of 1,024, against 13.6-14.0 s in one pass; a 4,096-token one 37 s against 34 s.
PREFILL_CHUNK_TOKENS = 512


def prefill_chunked(runner: LayerRunner, input_ids: torch.Tensor, chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                    cancel: Callable[[], bool] | None = None) -> KVCache:
    """``prefill`` of right-padded ``[batch, n]`` prompts in passes of about ``chunk_tokens`` tokens.

    The first ``c = max(1, chunk_tokens // batch)`` positions go through ``prefill`` into a cache with room for all
    ``n``; every later slice of ``c`` positions continues that same cache with ``forward`` under
    ``causal_extension_mask`` (as ``encode_question`` appends the question to a window), at its own rotary
    positions. Causal attention makes this the same computation as one pass, so the K/V agree with ``prefill`` up
    to float rounding (the matmuls see other shapes). Right padding stays harmless: it only ever follows a row's
    real tokens. ``cancel`` is asked between passes; True raises :class:`~cfic.errors.GroundingCancelled`."""
    from cfic.decoding.runner import causal_extension_mask, forward

    require_positive_int("chunk_tokens", chunk_tokens)
    batch, n = input_ids.shape
    step = max(1, chunk_tokens // batch)
    if n <= step:
        return prefill(runner, input_ids)
    cache = prefill(runner, input_ids[:, :step], capacity=n)
    # As in ``prefill``: with SwiftKV a document needs no outputs, so the upper layers only write their K/V.
    outputs = torch.zeros(0, dtype=torch.long, device=input_ids.device) if runner.swiftkv is not None else None
    start = step
    while start < n:
        if cancel is not None and cancel():
            raise GroundingCancelled("encoding cancelled")
        end = min(n, start + step)
        positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(batch, end - start)
        mask = causal_extension_mask(start, end - start, input_ids.device)
        forward(runner, input_ids[:, start:end], positions, cache, mask, outputs=outputs)
        start = end
    return cache


def read_documents(
    runner: LayerRunner,
    template: PromptTemplate,
    plans: Sequence[DocumentPlan],
    config: GroundingConfig,
    model_key: str,
    progress: bool = False,
    cancel: Callable[[], bool] | None = None,
    chunk_tokens: int = PREFILL_CHUNK_TOKENS,
) -> list[DocumentEncoding]:
    """Prefill planned documents. Windows of similar length are prefilled together, right-padded, up to
    ``config.encode_batch_tokens`` padded tokens per batch, each batch in passes of about ``chunk_tokens`` tokens
    (``prefill_chunked``). ``cancel`` is asked before every batch and between the passes of a batch; when it
    returns True, :class:`~cfic.errors.GroundingCancelled` is raised."""
    jobs: list[tuple[int, int, list[int]]] = []  # (plan index, window index, input ids)
    for p, plan in enumerate(plans):
        for w, (a, b) in enumerate(plan.windows):
            ids = list(template.head_ids)
            for s in range(a, b):
                ids.extend(plan.segment_ids[s])
            jobs.append((p, w, ids))
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][2]))
    kvs: dict[tuple[int, int], KVCache] = {}
    batches: list[list[int]] = []
    for j in order:
        if batches and len(jobs[batches[-1][0]][2]) * (len(batches[-1]) + 1) <= config.encode_batch_tokens:
            batches[-1].append(j)
        else:
            batches.append([j])
    iterator = batches
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="encoding documents", unit="batch")
    pad = template.eos_ids[0]
    with torch.inference_mode():
        for batch in iterator:
            if cancel is not None and cancel():
                raise GroundingCancelled("encoding cancelled")
            width = len(jobs[batch[0]][2])
            rows = [jobs[j][2] + [pad] * (width - len(jobs[j][2])) for j in batch]
            cache = prefill_chunked(runner, torch.tensor(rows, dtype=torch.long, device=runner.device),
                                    chunk_tokens, cancel)
            for r, j in enumerate(batch):
                p, w, ids = jobs[j]
                kvs[(p, w)] = cache.slice_row(r, len(ids)) if len(batch) > 1 or width != len(ids) else cache
    out = []
    for p, plan in enumerate(plans):
        windows = tuple(
            EncodedWindow(a, b, kvs[(p, w)].length, kvs[(p, w)], SentenceTrie(plan.answer_ids[a:b], offset=a))
            for w, (a, b) in enumerate(plan.windows)
        )
        out.append(DocumentEncoding(plan.document_id, plan.text, plan.metadata, plan.sentences, plan.answer_ids,
                                    plan.segment_ids, windows, model_key, plan.features))
    return out


def window_segment_lengths(document: SplitDocument, window: EncodedWindow) -> list[int]:
    """Token counts of the window's sentence segments: what ``question_pass(segment_lengths=...)`` needs to record
    the question's attention on each sentence."""
    return [len(document.segment_ids[s]) for s in range(window.first, window.last)]


class QuestionPass(NamedTuple):
    """What the question pass leaves: the query-extended ``cache`` (with free room for decoding), the first answer
    token's log-probabilities (float32 ``[vocab]``) and, when asked for, the last question token's hidden state
    leaving layer ``tap_layer`` (float32 ``[hidden]``; the answerability probe reads it) and, when asked for, the
    question's attention over the window's sentences (:class:`~cfic.decoding.attention.SentenceAttention`)."""

    cache: KVCache
    first: torch.Tensor
    tapped: torch.Tensor | None
    attention: SentenceAttention | None = None


def question_pass(
    runner: LayerRunner, window: EncodedWindow, query_ids: Sequence[int], room: int, tap_layer: int | None = None,
    segment_lengths: Sequence[int] | None = None, query_update: QueryUpdate | None = None,
    tap: SentenceAttentionTap | None = None,
) -> QuestionPass:
    """Append the question to a private copy of the window's cache (the encoding itself stays untouched).

    ``segment_lengths``: the token counts of the window's sentence segments (``DocumentEncoding.segment_ids``
    lengths for ``window.first .. window.last``); given, the pass also records the question's attention over them
    (with ``query_update``'s queries where it has some: :class:`~cfic.decoding.attention.QueryUpdate`). ``tap``: the
    caller's own tap instead (a subclass that records more, e.g. ``cfic fit-query-heads``' material), so training
    material comes from this very pass."""
    from cfic.decoding.runner import PLAIN, causal_extension_mask, forward

    cache = window.kv.fork(len(query_ids) + room)
    start = cache.length
    ids = torch.tensor([list(query_ids)], dtype=torch.long, device=runner.device)
    positions = torch.arange(start, start + ids.shape[1], device=runner.device).unsqueeze(0)
    mask = causal_extension_mask(start, ids.shape[1], runner.device)
    last = torch.tensor([ids.shape[1] - 1], device=runner.device)  # only the last token's output is read
    if tap is None and segment_lengths is not None:
        head = window.n_tokens - sum(segment_lengths)
        tap = SentenceAttentionTap(sentence_token_bounds(head, list(segment_lengths)).to(runner.device),
                                   query_update=query_update)
    layers = PLAIN if tap is None else tap
    tapped, lower, resume = None, None, 0
    if tap_layer is not None:
        lower = forward(runner, ids, positions, cache, mask, stop=tap_layer, layers=layers)
        tapped, resume = lower[0, -1].float(), tap_layer
    hidden = forward(runner, ids, positions, cache, mask, outputs=last, start=resume, hidden=lower, layers=layers)
    return QuestionPass(cache, torch.log_softmax(runner.logits(hidden[0, -1]), dim=-1), tapped,
                        None if tap is None else tap.result())


def encode_question(
    runner: LayerRunner, window: EncodedWindow, query_ids: Sequence[int], room: int
) -> tuple[KVCache, torch.Tensor]:
    """:func:`question_pass` without a tap: the query-extended cache and the first answer token's log-probabilities."""
    qp = question_pass(runner, window, query_ids, room)
    return qp.cache, qp.first

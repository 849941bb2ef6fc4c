"""Turning what callers hold into :class:`~cfic.types.Document`: one set of rules for the Python API, the index, the
LangChain components, the CLI and the REST service.

Accepted: a ``str``, a ``{"id", "text", "metadata"}`` dict, a ``cfic.Document`` or a LangChain ``Document``
(``page_content``/``metadata``/``id``, recognised by its attributes so LangChain stays optional). Where a document
has no id, ``default_id`` names it: the grounder uses its position in the request (evidence points back into the
list the caller sent), the index a hash of its content (adding the same text twice keeps one copy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cfic.errors import CficError, EmptyDocumentError
from cfic.types import Document

DOCUMENT_FIELDS = frozenset({"id", "text", "metadata"})

DefaultId = Callable[[str, int], str]


def position_id(text: str, position: int) -> str:
    """The document's position in the request, as a string."""
    return str(position)


def content_id(text: str, position: int) -> str:
    """The first 16 hex digits of the text's SHA-256: the same text gets the same id wherever it comes from."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fields(item: Any, where: str) -> tuple[Any, Any, Any]:
    if isinstance(item, Document):
        return item.id, item.text, item.metadata
    if isinstance(item, str):
        return None, item, None
    if isinstance(item, dict):
        if not isinstance(item.get("text"), str):
            raise CficError(f"{where}: a document dict needs a 'text' string")
        unknown = set(item) - DOCUMENT_FIELDS
        if unknown:
            raise CficError(f"{where}: unknown document field(s): {', '.join(sorted(unknown))}")
        return item.get("id"), item["text"], item.get("metadata")
    if hasattr(item, "page_content"):
        return getattr(item, "id", None), item.page_content, getattr(item, "metadata", None)
    raise CficError(f"{where} is a {type(item).__name__}; expected str, dict or Document")


def as_document(item: Any, position: int = 0, *, default_id: DefaultId = position_id,
                allow_empty: bool = False) -> Document:
    """``item`` as a Document with a string id and a metadata dict; a CficError naming the document otherwise.

    Ids may be given as strings or integers (stored as strings). ``allow_empty=False`` refuses whitespace-only
    text with :class:`~cfic.errors.EmptyDocumentError` up front."""
    where = f"document {position}"
    doc_id, text, metadata = _fields(item, where)
    if not isinstance(text, str):
        raise CficError(f"{where}: text must be a string")
    if doc_id is None or doc_id == "":
        doc_id = default_id(text, position)
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CficError(f"{where}: id must be a non-empty string, got {doc_id!r}")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CficError(f"document {doc_id!r}: metadata must be an object")
    if not allow_empty and not text.strip():
        raise EmptyDocumentError(f"document {str(doc_id)!r} is empty or whitespace only")
    return Document(text=text, id=str(doc_id), metadata=dict(metadata))

"""Errors a user can cause. Every one is a ``ValueError`` so callers can catch bad input without knowing cfic."""


class CficError(ValueError):
    """Bad input or configuration: the message is meant for the person who typed it."""


class EmptyDocumentError(CficError):
    """A document is empty or whitespace only."""


class EmptyQueryError(CficError):
    """The query is empty or whitespace only."""


class QueryTooLongError(CficError):
    """The query does not fit the model's context next to the document."""


class DocumentReadError(CficError):
    """A document file is missing, a directory, binary, or not UTF-8."""


class ModelLoadError(CficError):
    """The model could not be found or loaded."""


def require_positive_int(name: str, value: object) -> int:
    """``value`` when it is a whole number >= 1, else a CficError naming ``name``. ``True`` is refused although
    Python counts it as 1: a flag where a count belongs is a mistake."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CficError(f"{name} must be a positive integer, got {value!r}")
    return value


class GroundingCancelled(Exception):  # noqa: N818 - a signal, not a failure of the caller's input
    """The caller's ``cancel`` callback said stop (deadline passed, client left): raised between encode batches,
    before a paragraph reading and between windows, so abandoned work frees the model within one step instead of
    running to the end."""

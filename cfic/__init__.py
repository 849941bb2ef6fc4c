"""cfic: chunking-free in-context grounding — verbatim evidence from whole documents."""

from cfic.config import GroundingConfig
from cfic.errors import CficError
from cfic.types import Document, Evidence, GroundingResult, Usage

__all__ = [
    "CFICCompressor",
    "CFICRetriever",
    "CficError",
    "Document",
    "Evidence",
    "Grounder",
    "GroundingConfig",
    "GroundingResult",
    "Usage",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers, langchain) only when asked for.
    if name == "Grounder":
        from cfic.grounder import Grounder

        return Grounder
    if name in ("CFICRetriever", "CFICCompressor"):
        from cfic.retrieval import langchain as _lc

        return getattr(_lc, name)
    raise AttributeError(f"module 'cfic' has no attribute {name!r}")

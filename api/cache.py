"""An LRU cache of document encodings, bounded by the KV memory they hold.

Why: a document's prefill is most of the cost of a first question about it, and CFIC puts the document before
the question precisely so that its KV prefix can be reused. Services see the same documents again and again (a
user asks several questions about one contract), so keeping recent encodings turns later questions into a
question-only prefill. The bound is in bytes, not entries, because one long document can hold more KV than a
hundred short ones.

Keys are ``(sha256(text), model name, grounder model key, config.encoding_key())``: the text's hash, not its
id, because two requests may give the same text different ids (the cached encoding is re-labelled on the way
out), and the model/configuration parts make an encoding from another model or window layout unreachable."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


CacheKey = tuple[Hashable, ...]


def encoding_cache_key(text: str, model_name: str, model_key: str, encoding_key: tuple) -> CacheKey:
    """The cache key of ``text`` encoded by a given model and encoding configuration."""
    # surrogatepass: the key must never raise, even for text the tokenizer would refuse (that error comes
    # later, from the core, as a proper CficError).
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return (digest, model_name, model_key, encoding_key)


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    rejected_too_large: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class EncodingCache:
    """Thread-safe LRU of encodings whose total ``nbytes`` never exceeds ``max_bytes``.

    An encoding larger than the whole budget is not stored (storing it would evict everything for one
    document). ``max_bytes=0`` disables caching. Values are immutable encodings, so handing the same object to
    several requests is safe; eviction only drops the cache's reference (a request still using it keeps it
    alive)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[CacheKey, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._too_large = 0

    def get(self, key: CacheKey) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return item[0]

    def peek(self, key: CacheKey) -> bool:
        """Whether ``key`` is cached, without touching recency or counters."""
        with self._lock:
            return key in self._items

    def put(self, key: CacheKey, value: Sized) -> bool:
        """Store ``value``; returns False when it is larger than the whole budget (and so not stored)."""
        size = int(value.nbytes)
        with self._lock:
            if size > self.max_bytes:
                self._too_large += 1
                return False
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._items and self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._items[key] = (value, size)
            self._bytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._items), self._bytes, self.max_bytes, self._hits, self._misses,
                              self._evictions, self._too_large)

"""The document-encoding cache and the service settings: bounds, LRU order, keys, thread safety."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from cfic.api.cache import EncodingCache, encoding_cache_key
from cfic.api.settings import ServiceSettings, parse_size
from cfic.errors import CficError


@dataclass(frozen=True)
class Blob:
    """Anything with ``nbytes`` can be cached; the real encodings are exercised below and in the service
    tests."""

    name: str
    nbytes: int


def test_total_bytes_never_exceed_the_budget_and_lru_is_evicted_first():
    cache = EncodingCache(max_bytes=100)
    for name in "abc":
        assert cache.put((name,), Blob(name, 30))
    assert cache.get(("a",)).name == "a"  # a is now the most recently used; b the least
    assert cache.put(("d",), Blob("d", 30))
    assert cache.nbytes <= 100
    assert cache.get(("b",)) is None
    assert {k for k in "acd" if cache.peek((k,))} == set("acd")
    stats = cache.stats()
    assert stats.evictions == 1 and stats.entries == 3 and stats.bytes == 90


def test_an_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing():
    cache = EncodingCache(max_bytes=100)
    cache.put(("small",), Blob("small", 60))
    assert not cache.put(("huge",), Blob("huge", 101))
    assert cache.peek(("small",)) and not cache.peek(("huge",))
    assert cache.stats().rejected_too_large == 1


def test_zero_budget_disables_caching():
    cache = EncodingCache(max_bytes=0)
    assert not cache.put(("a",), Blob("a", 1))
    assert len(cache) == 0


def test_replacing_a_key_does_not_double_count_its_bytes():
    cache = EncodingCache(max_bytes=100)
    cache.put(("a",), Blob("a", 40))
    cache.put(("a",), Blob("a2", 50))
    assert cache.nbytes == 50 and len(cache) == 1 and cache.get(("a",)).name == "a2"


def test_keys_separate_text_model_and_configuration():
    base = encoding_cache_key("same text", "m", "k1", (256, 96))
    assert base == encoding_cache_key("same text", "m", "k1", (256, 96))
    assert base != encoding_cache_key("same text!", "m", "k1", (256, 96))
    assert base != encoding_cache_key("same text", "other-model", "k1", (256, 96))
    assert base != encoding_cache_key("same text", "m", "k2", (256, 96))
    assert base != encoding_cache_key("same text", "m", "k1", (128, 96))
    # Text the tokenizer would refuse still gets a key (the core reports the error, not the cache).
    encoding_cache_key("lone \ud800 surrogate", "m", "k", ())


def test_concurrent_puts_and_gets_keep_the_byte_account_exact():
    cache = EncodingCache(max_bytes=1000)

    def work(t: int) -> None:
        for i in range(300):
            cache.put((t, i % 17), Blob(f"{t}-{i}", 7 + (i % 13)))
            cache.get((t, (i * 7) % 17))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    held = sum(size for _, size in cache._items.values())
    assert cache.nbytes == held <= 1000


def test_real_encodings_are_cached_by_their_kv_bytes(tiny_grounder):
    texts = ["The Normans conquered England in 1066. They built castles.", "Paris is in France. It has a river."]
    encodings = tiny_grounder.encode(texts)
    sizes = [e.nbytes for e in encodings]
    assert all(s > 0 for s in sizes)
    cache = EncodingCache(max_bytes=max(sizes))  # room for one of them only
    g = tiny_grounder
    keys = [encoding_cache_key(t, g.model_name, g.model_key, g.config.encoding_key()) for t in texts]
    cache.put(keys[0], encodings[0])
    cache.put(keys[1], encodings[1])
    assert cache.nbytes <= max(sizes)
    assert cache.get(keys[1]) is encodings[1]
    assert cache.get(keys[0]) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1048576), ("512MiB", 512 * 1024**2), ("2GB", 2 * 1000**3), ("1.5 KiB", 1536), ("0", 0),
    ("10k", 10_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "12XB", "1e9"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(CficError):
        parse_size(text)


def test_settings_validate_and_never_print_the_api_key():
    settings = ServiceSettings(api_key="hunter2-secret")
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings)
    with pytest.raises(CficError):
        ServiceSettings(max_documents=0)
    with pytest.raises(CficError):
        ServiceSettings(timeout_s=0)
    with pytest.raises(CficError):
        ServiceSettings(api_key="   ")

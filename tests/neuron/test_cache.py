"""The model cache's room decisions (pure) and its bookkeeping on disk."""

from __future__ import annotations

import pytest

from helexa.roles.neuron.cache import CacheItem, ModelCache, NoRoom, plan_room

GB = 1024**3


def items(*specs):
    """``(key, blobs, last_used, in_use)`` tuples as items."""
    return [CacheItem(k, frozenset(b), 0, used, busy) for k, b, used, busy in specs]


def test_nothing_is_evicted_when_it_fits():
    assert plan_room(1, free=10, limit=10, items=items(("a", {"x"}, 1, False)), blob_sizes={"x": 5}) == []


def test_least_recently_used_goes_first_and_only_as_much_as_needed():
    cached = items(("new", {"n"}, 30, False), ("old", {"o"}, 10, False), ("mid", {"m"}, 20, False))
    sizes = {"n": 3, "o": 3, "m": 3}
    assert plan_room(4, free=100, limit=10, items=cached, blob_sizes=sizes) == ["old"]
    assert plan_room(7, free=100, limit=10, items=cached, blob_sizes=sizes) == ["old", "mid"]


def test_a_source_in_use_is_never_evicted():
    cached = items(("busy", {"b"}, 1, True), ("idle", {"i"}, 2, False))
    assert plan_room(5, free=100, limit=10, items=cached, blob_sizes={"b": 3, "i": 3}) == ["idle"]
    with pytest.raises(NoRoom) as err:
        plan_room(8, free=100, limit=10, items=cached, blob_sizes={"b": 3, "i": 3})
    assert not err.value.disk and "cache limit" in str(err.value)


def test_a_shared_blob_frees_its_bytes_only_with_its_last_holder():
    cached = items(("a", {"shared"}, 1, False), ("b", {"shared", "own"}, 2, False))
    sizes = {"shared": 5, "own": 1}
    # Evicting a alone frees nothing (b still holds the blob): b must go too.
    assert plan_room(5, free=100, limit=10, items=cached, blob_sizes=sizes) == ["a", "b"]


def test_free_disk_space_is_a_limit_of_its_own():
    cached = items(("a", {"x"}, 1, False))
    assert plan_room(4, free=2, limit=100, items=cached, blob_sizes={"x": 3}) == ["a"]
    with pytest.raises(NoRoom) as err:
        plan_room(9, free=2, limit=100, items=cached, blob_sizes={"x": 3})
    assert err.value.disk and "not enough disk space" in str(err.value) and "3 B more in unused" in str(err.value)


def test_min_free_is_kept_free():
    with pytest.raises(NoRoom) as err:
        plan_room(5, free=6, limit=100, min_free=2, items=[], blob_sizes={})
    assert err.value.disk and "2 B to be left free" in str(err.value)


def test_other_downloads_reservations_count():
    with pytest.raises(NoRoom):
        plan_room(5, free=100, limit=10, items=[], blob_sizes={}, reserved=6)


def test_stale_partial_downloads_are_evictable():
    cached = [CacheItem("partial:x.part", frozenset(), own_bytes=6, last_used=1)]
    assert plan_room(5, free=100, limit=10, items=cached, blob_sizes={}) == ["partial:x.part"]


def test_the_cache_reserves_room_and_counts_reservations(tmp_path):
    cache = ModelCache(tmp_path, limit_bytes=10, free_space=lambda path: 100)
    first = cache.reserve(6)
    with pytest.raises(NoRoom):
        cache.reserve(6)
    first.release()
    cache.reserve(6).release()


def test_a_committed_source_survives_a_new_cache_object_and_a_lost_blob_forgets_it(tmp_path):
    cache = ModelCache(tmp_path, limit_bytes=GB)
    part = cache.partial("p")
    part.write_bytes(b"data")
    cache.adopt(part, "d" * 64)
    path = cache.commit("key", "https://x/y.bin", {"y.bin": "d" * 64}, file="y.bin")
    assert path.read_bytes() == b"data"
    again = ModelCache(tmp_path, limit_bytes=GB)
    assert again.cached("key") == path
    cache.blob("d" * 64).unlink()
    assert again.cached("key") is None and not (tmp_path / "refs" / "key.json").exists()


def test_what_the_cache_holds_is_its_sources_most_recently_used_first_and_bounded(tmp_path):
    """What a neuron reports to its cortex (``Join.cached``): one key per source however many
    files it has, at most ``limit``, newest first; a source whose blob went is not held; and
    each change moves ``generation`` (the heartbeats report again)."""
    import hashlib
    import os

    cache = ModelCache(tmp_path, limit_bytes=GB)
    assert cache.held(10) == () and cache.generation == 0
    for i in range(5):
        data = f"weights {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        (tmp_path / "blobs").mkdir(exist_ok=True)
        cache.blob(sha).write_bytes(data)
        files = {f"shard-{j}.safetensors": sha for j in range(50)}  # a repository of many files
        cache.commit(f"k{i}", f"hf://org/m{i}", files, file=None)
        os.utime(tmp_path / "refs" / f"k{i}.json", (1000 + i, 1000 + i))
    assert cache.generation == 5
    assert cache.held(10) == ("k4", "k3", "k2", "k1", "k0")
    assert cache.held(2) == ("k4", "k3")
    cache.blob(hashlib.sha256(b"weights 3").hexdigest()).unlink()
    assert cache.held(10) == ("k4", "k2", "k1", "k0")
    assert cache.cached("k3") is None and cache.generation == 6  # dropped: a change

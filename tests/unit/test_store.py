import pytest
import torch

from vllm_kvflow.store import ChunkKV, ChunkStore, chunk_key


def _entry(tokens, nbytes_per_token=16):
    t = len(tokens)
    return ChunkKV(tuple(tokens), torch.zeros(1, t, 1, nbytes_per_token // 4, dtype=torch.float32),
                   torch.zeros(1, t, 1, nbytes_per_token // 4, dtype=torch.float32), local_start=1)


def test_key_is_position_independent_and_scoped():
    a = chunk_key("m", "", [1], [5, 6, 7])
    assert a == chunk_key("m", "", [1], [5, 6, 7])
    assert a != chunk_key("m", "tenant", [1], [5, 6, 7])
    assert a != chunk_key("other", "", [1], [5, 6, 7])
    assert a != chunk_key("m", "", [2], [5, 6, 7])
    assert a != chunk_key("m", "", [1], [5, 6, 8])


def test_key_is_stable_across_input_types_and_releases():
    """Keys name files in the disk tier, so they must not change with the input type or
    with how the bytes are produced: pinned to a digest computed once."""
    import numpy as np

    key = chunk_key("m", "ns", [1], [5, 6, 70000])
    assert key == chunk_key("m", "ns", (1,), (5, 6, 70000))
    assert key == chunk_key("m", "ns", np.array([1]), np.array([5, 6, 70000], dtype=np.int32))
    import hashlib

    def field(tag, data):  # tag, little-endian 8-byte length, data
        return tag + len(data).to_bytes(8, "little") + data
    expected = hashlib.sha256(
        field(b"S", b"m") + field(b"S", b"ns") + field(b"B", (1).to_bytes(8, "little"))
        + field(b"B", b"".join(t.to_bytes(8, "little") for t in (5, 6, 70000)))).hexdigest()
    assert key == expected
    assert chunk_key("m", "ns", [1], []) != chunk_key("m", "ns", [1], [0])


def test_store_matches_token_ids_of_any_int_type():
    import numpy as np

    store = ChunkStore(capacity_bytes=1 << 20)
    store.put("k", _entry([3, 4]))
    assert store.get("k", np.array([3, 4])) is not None
    assert store.get("k", (3, 4)) is not None
    assert store.get("k", [3, 5]) is None


def test_capacity_and_lru_eviction():
    e = _entry([1, 2])  # 2 tokens * 16 B * 2 (K and V) = 64 B
    assert e.nbytes == 64
    store = ChunkStore(capacity_bytes=192)
    for name in "abc":
        assert store.put(name, _entry([1, 2]))
    assert store.nbytes == 192 and len(store) == 3
    assert store.get("a", [1, 2]) is not None  # a becomes most recent
    store.put("d", _entry([1, 2]))  # evicts b, the least recently used
    assert store.keys_lru_order() == ["c", "a", "d"]
    assert store.counters.evictions == 1 and store.nbytes == 192


def test_too_large_entry_is_rejected_not_stored():
    store = ChunkStore(capacity_bytes=32)
    assert not store.put("x", _entry([1, 2]))
    assert len(store) == 0 and store.counters.rejected_too_large == 1


def test_hit_verifies_token_ids_not_only_the_hash():
    store = ChunkStore(capacity_bytes=1 << 20)
    store.put("k", _entry([1, 2, 3]))
    assert store.get("k", [1, 2, 4]) is None  # same key, other tokens: a collision
    assert store.counters.hash_collisions == 1 and store.counters.misses == 1
    assert store.get("k", [1, 2, 3]) is not None and store.counters.hits == 1


def test_negative_capacity_is_an_error():
    with pytest.raises(ValueError):
        ChunkStore(-1)

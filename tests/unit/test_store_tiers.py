"""Tiered chunk store: memory tiers (demotion/promotion, capacities) and the disk tier
(bit-exact round trip, corrupt and foreign files never used, restart)."""
import logging

import pytest
import torch

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.store import ChunkKV, ChunkStore, MemoryTier
from vllm_kvflow.store.build import build_store
from vllm_kvflow.store.disk import DiskTier

ID = "model=m|dtype=float32|layers=2|kv_heads=2|head_size=4|tp0/1"


def _entry(tokens, seed=0, dtype=torch.float32):
    """2 layers x T tokens x 2 heads x 4 dims; float32: 64 B per token per K or V."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, len(tokens), 2, 4)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return ChunkKV(tuple(tokens), k.to(dtype), v.to(dtype), local_start=1)


def _same(a: ChunkKV, b: ChunkKV) -> bool:
    """Bit-exact: same bytes, dtype, shapes, tokens and local start."""
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return (a.token_ids == b.token_ids and a.local_start == b.local_start
            and a.keys.dtype == b.keys.dtype and a.keys.shape == b.keys.shape
            and torch.equal(raw(a.keys), raw(b.keys)) and torch.equal(raw(a.values), raw(b.values)))


def _two_tier(first=256, second=512, disk=None):
    return ChunkStore(tiers=[MemoryTier("device", first), MemoryTier("host", second)], disk=disk)


@pytest.fixture
def disk_store(tmp_path):
    """Factory of stores on one directory; every store made is closed at the end."""
    made = []

    def make(capacity=1 << 20, identity=ID, memory=256):
        store = ChunkStore(tiers=[MemoryTier("host", memory)],
                           disk=DiskTier(tmp_path, capacity, identity))
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# -- memory tiers ---------------------------------------------------------------------------
def test_eviction_demotes_in_lru_order_and_capacities_hold():
    store = _two_tier()  # entries of 2 tokens are 256 B: one fits the first tier, two the second
    for i, name in enumerate("abcd"):
        assert store.put(name, _entry([1, 2], seed=i))
    first, second = store.tiers
    assert first.keys_lru_order() == ["d"]
    assert second.keys_lru_order() == ["b", "c"]  # a fell off the end: no disk tier
    assert first.nbytes == 256 <= first.capacity_bytes and second.nbytes == 512
    assert first.counters.evictions == 3 and second.counters.evictions == 1
    assert store.counters.evictions == 1 and "a" not in store
    assert store.get("a", [1, 2]) is None and store.counters.misses == 1


def test_hit_in_lower_tier_promotes_and_demotes_the_displaced():
    store = _two_tier()
    for i, name in enumerate("bcd"):
        store.put(name, _entry([1, 2], seed=i))
    got = store.get("b", [1, 2])
    assert got is not None and _same(got, _entry([1, 2], seed=0))
    first, second = store.tiers
    assert first.keys_lru_order() == ["b"]
    assert second.keys_lru_order() == ["c", "d"]  # d, displaced from the top, is now newest
    assert second.counters.hits == 1 and first.counters.hits == 0 and store.counters.hits == 1
    assert store.get("b", [1, 2]) is not None and first.counters.hits == 1


def test_entry_too_big_for_the_first_tier_lands_in_the_next():
    store = _two_tier(first=256, second=1024)
    assert store.put("big", _entry([1, 2, 3, 4]))  # 512 B
    assert store.tiers[0].keys_lru_order() == [] and store.tiers[1].keys_lru_order() == ["big"]
    assert store.get("big", [1, 2, 3, 4]) is not None  # stays where it fits
    assert not store.put("huge", _entry(list(range(10))))  # 1280 B: no tier holds it
    assert store.counters.rejected_too_large == 1


def test_config_tiers_cpu_and_device():
    cfg = KVFlowConfig(store_capacity_gb=1.0)
    assert cfg.store_memory_tiers(on_device=False) == [("host", 1 << 30)]
    assert cfg.store_memory_tiers(on_device=True) == [("device", 1 << 30)]
    cfg = KVFlowConfig(store_device_gb=2.0, store_host_gb=0.5)
    assert cfg.store_memory_tiers(on_device=True) == [("device", 2 << 30), ("host", 1 << 29)]
    assert cfg.store_memory_tiers(on_device=False) == [("host", 1 << 29)]
    with pytest.raises(ValueError):
        KVFlowConfig(store_disk_gb=-1)
    with pytest.raises(ValueError):
        KVFlowConfig.from_extra_config({"store_disk_path": ""})


def test_build_store_on_cpu_with_disk(tmp_path):
    cfg = KVFlowConfig(store_capacity_gb=0.25, store_disk_path=str(tmp_path / "kv"),
                       store_disk_gb=0.5)
    store = build_store(cfg, "cpu", ID)
    try:
        assert [(t.name, t.capacity_bytes) for t in store.tiers] == [("host", 1 << 28)]
        assert store.disk.capacity_bytes == 1 << 29 and (tmp_path / "kv").is_dir()
        assert set(store.stats()["tiers"]) == {"host", "disk"}
    finally:
        store.close()


# -- disk tier --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_round_trip_is_bit_exact_and_promotes(disk_store, dtype):
    store = disk_store(memory=0)  # nothing fits in memory: every hit comes from disk
    entry = _entry([5, 6, 7], seed=3, dtype=dtype)
    assert store.put("k", entry)
    store.flush()
    got = store.get("k", [5, 6, 7])
    assert got is not None and got is not entry and _same(got, entry)
    assert store.disk.counters.hits == 1 and store.disk.counters.inserts == 1
    # With room in memory, a disk hit is promoted and the file is kept.
    store2 = disk_store(memory=1 << 20)
    assert store2.get("k", [5, 6, 7]) is not None
    assert store2.tiers[0].keys_lru_order() == ["k"] and "k" in store2.disk
    assert store2.get("k", [5, 6, 7]) is not None
    assert store2.tiers[0].counters.hits == 1 and store2.disk.counters.hits == 1


def test_memory_eviction_keeps_the_chunk_on_disk(disk_store):
    store = disk_store(memory=256)
    for i, name in enumerate("ab"):
        store.put(name, _entry([1, 2], seed=i))
    store.flush()
    assert store.tiers[0].keys_lru_order() == ["b"]
    got = store.get("a", [1, 2])
    assert got is not None and _same(got, _entry([1, 2], seed=0))
    assert store.disk.counters.hits == 1 and store.counters.evictions == 0


def test_disk_capacity_evicts_least_recently_used_files(disk_store, tmp_path):
    one = len(_file_bytes(disk_store, tmp_path))  # one file's size on disk
    store = disk_store(capacity=2 * one)
    for i, name in enumerate("abc"):
        store.put(name, _entry([1, 2], seed=i))
        store.flush()
    assert store.disk.keys_lru_order() == ["b", "c"] and store.disk.nbytes == 2 * one
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert store.disk.counters.evictions == 1 and store.counters.evictions == 1


def _file_bytes(disk_store, tmp_path):
    """Bytes of the file of one 2-token entry (written by a throwaway store, removed)."""
    probe = disk_store()
    probe.put("z", _entry([1, 2]))
    probe.flush()
    path = probe.disk.file_for("z")
    data = path.read_bytes()
    probe.discard("z")
    assert not path.exists()
    return data


def test_restart_finds_the_chunks(disk_store, tmp_path):
    store = disk_store()
    entries = {name: _entry([1, 2, i], seed=i) for i, name in enumerate("abc")}
    for name, entry in entries.items():
        store.put(name, entry)
    store.close()  # a shutdown: queued writes land
    again = disk_store()
    assert set(again.disk.keys_lru_order()) == {"a", "b", "c"} and len(again) == 0
    for i, (name, entry) in enumerate(entries.items()):
        got = again.get(name, [1, 2, i])
        assert got is not None and _same(got, entry)
    assert again.disk.counters.hits == 3 and again.counters.misses == 0


def _corrupt_after_restart(disk_store, damage):
    store = disk_store()
    store.put("a", _entry([1, 2], seed=1))
    store.put("b", _entry([3, 4], seed=2))
    store.close()
    damage(store.disk.file_for("a"))
    return disk_store(), store.disk.file_for("a")


def test_truncated_file_is_skipped_logged_and_removed(disk_store, caplog):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])

    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        store, path = _corrupt_after_restart(disk_store, truncate)
    assert "truncated" in caplog.text and str(path) in caplog.text
    assert not path.exists() and "a" not in store.disk
    assert store.disk.counters.corrupt_skipped == 1
    assert store.get("a", [1, 2]) is None and store.counters.misses == 1
    assert store.get("b", [3, 4]) is not None  # the intact file is still served


def test_flipped_payload_byte_is_caught_by_the_checksum(disk_store, caplog):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[-10] ^= 0x01  # inside the tensor data: the size is intact, the header parses
        path.write_bytes(bytes(data))

    store, path = _corrupt_after_restart(disk_store, flip)
    assert "a" in store.disk  # indexing only checks header and size
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        assert store.get("a", [1, 2]) is None
    assert "checksum mismatch" in caplog.text
    assert not path.exists() and store.disk.counters.corrupt_skipped == 1
    assert store.counters.misses == 1 and store.counters.hits == 0
    assert store.get("a", [1, 2]) is None  # never served later either


def test_flipped_header_byte_is_skipped(disk_store, caplog):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[3] ^= 0x10  # the header length field
        path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        store, path = _corrupt_after_restart(disk_store, flip)
    assert "bad header length" in caplog.text
    assert not path.exists() and store.get("a", [1, 2]) is None
    assert store.disk.counters.corrupt_skipped == 1


def test_file_truncated_while_running_is_never_returned(disk_store):
    store = disk_store(memory=0)
    store.put("a", _entry([1, 2]))
    store.flush()
    path = store.disk.file_for("a")
    path.write_bytes(path.read_bytes()[:-1])
    assert store.get("a", [1, 2]) is None and store.disk.counters.corrupt_skipped == 1


def test_other_model_identity_is_never_used(disk_store, tmp_path, caplog):
    store = disk_store(identity=ID)
    store.put("a", _entry([1, 2]))
    store.close()
    other = disk_store(identity=ID.replace("layers=2", "layers=3"))
    assert other.get("a", [1, 2]) is None and len(other.disk) == 0
    assert store.disk.file_for("a").exists()  # another model's file is left alone
    # Even under our own file name, a header naming another identity is refused.
    other.disk.file_for("a").write_bytes(store.disk.file_for("a").read_bytes())
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        third = disk_store(identity=other.disk.identity)
    assert "another model" in caplog.text
    assert third.get("a", [1, 2]) is None and third.disk.counters.foreign_skipped == 1


def test_hit_verifies_token_ids_from_disk(disk_store):
    store = disk_store(memory=0)
    store.put("k", _entry([1, 2, 3]))
    store.flush()
    assert store.get("k", [1, 2, 4]) is None and store.counters.hash_collisions == 1


def test_full_write_queue_drops_write_through_without_blocking(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20, ID, queue_bytes=1)
    store = ChunkStore(tiers=[MemoryTier("host", 1 << 20)], disk=disk)
    try:
        with disk._cond:  # hold the writer back so the queue stays full
            for i in range(3):
                store.put(f"k{i}", _entry([1, 2], seed=i))
            assert len(disk._pending) == 1 and disk.counters.writes_dropped == 2
        assert len(store) == 3  # memory still holds every entry
    finally:
        store.close()

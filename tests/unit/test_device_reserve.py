"""The device tier's reservation (store/device_reserve.py) where there is no GPU: a no-op
on CPU stores, and a tier that the device could not hold whole shrinks to what was
reserved. tests/gpu/test_device_reserve_gpu.py checks the reservation itself: entries
allocated inside it call no cudaMalloc."""
import contextlib
import logging

import torch

from vllm_kvflow.store import device_reserve
from vllm_kvflow.store.chunk_store import ChunkStore
from vllm_kvflow.store.entry import ChunkKV
from vllm_kvflow.store.tiers import MemoryTier


def test_cpu_stores_reserve_nothing_and_allocate_as_before():
    assert device_reserve.reserve_for("cpu", 1 << 30) is None
    store = ChunkStore(1 << 20)
    assert store.reserve_device_memory() == 0
    with store.allocating():
        entry = ChunkKV((1, 2), torch.zeros(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 1)
    assert store.put("k", entry) and store.get("k", (1, 2)) is not None


class FakeReserve:
    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.entered = 0

    @contextlib.contextmanager
    def allocating(self):
        self.entered += 1
        yield


def test_a_device_tier_shrinks_to_the_reserved_bytes_and_allocates_from_them(monkeypatch, caplog):
    asked = []

    def fake_reserve_for(device, nbytes, stream=None):
        asked.append((str(device), nbytes, stream))
        return FakeReserve(nbytes // 4)

    monkeypatch.setattr(device_reserve, "reserve_for", fake_reserve_for)
    store = ChunkStore(tiers=[MemoryTier("device", 4 << 20, device="cuda"),
                              MemoryTier("host", 4 << 20, device="cpu")])
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        assert store.reserve_device_memory("the-stream") == 1 << 20
    assert asked == [("cuda", 4 << 20, "the-stream")]
    assert store.tiers[0].capacity_bytes == 1 << 20 and store.tiers[1].capacity_bytes == 4 << 20
    assert "holds that much" in caplog.text
    with store.allocating():
        pass
    assert store._reserve.entered == 1


def test_a_store_without_a_device_tier_asks_for_nothing(monkeypatch):
    monkeypatch.setattr(device_reserve, "reserve_for", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    store = ChunkStore(tiers=[MemoryTier("host", 1 << 20, device="cpu")])
    assert store.reserve_device_memory() == 0

"""The device tier's reserved memory on a real GPU (store/device_reserve.py): entries
allocated inside the store's `allocating()` come from memory taken at engine start,
with no cudaMalloc, even after torch.cuda.empty_cache() (which vLLM calls after
kvflow's start); outside it, or on another stream, the driver is asked as before.
Not yet run on a GPU (written after the 2026-12-01 device session ended); the engines
reserve only with KVFLOW_RESERVE_DEVICE_TIER=1 until it has."""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ENTRY = (32, 480, 8, 128)  # a Llama-8B-shaped chunk's keys: 31.5 MB in bf16


def _mallocs() -> int:
    return int(torch.cuda.memory_stats()["num_device_alloc"])


def _store(gib: float):
    from vllm_kvflow.store.chunk_store import ChunkStore
    from vllm_kvflow.store.tiers import MemoryTier

    return ChunkStore(tiers=[MemoryTier("device", int(gib * 2**30), device="cuda"),
                             MemoryTier("host", 1 << 30, device="cpu")])


def test_entries_stored_after_the_reservation_call_no_cudamalloc():
    from vllm_kvflow.blend.private_stream import private_stream
    from vllm_kvflow.store.entry import ChunkKV

    stream = private_stream("cuda", "blend")
    store = _store(2.0)
    assert store.reserve_device_memory(stream) == 2 << 30
    torch.cuda.empty_cache()  # vLLM's graph capture empties the cache after kvflow's start
    before = _mallocs()
    entries = []
    with torch.cuda.stream(stream):
        for i in range(20):  # 20 x 2 x 31.5 MB = 1.2 GiB
            with store.allocating():
                k = torch.full(ENTRY, float(i), dtype=torch.bfloat16, device="cuda")
                v = k + 1
            entry = ChunkKV((i,), k, v, 1)
            assert store.put(f"c{i}", entry)
            entries.append(entry)
    stream.synchronize()
    assert _mallocs() == before
    for i, entry in enumerate(entries):
        got = store.get(f"c{i}", (i,))
        assert got.keys.data_ptr() == entry.keys.data_ptr()  # stored in place, not copied
        assert float(got.keys[0, 0, 0, 0]) == i and float(got.values[-1, -1, -1, -1]) == i + 1

    # The control: the same allocation outside the context, or inside it on a stream the
    # reservation was not made on, asks the driver.
    before = _mallocs()
    with torch.cuda.stream(stream):
        torch.empty(ENTRY, dtype=torch.bfloat16, device="cuda")
    assert _mallocs() == before + 1
    with store.allocating():
        torch.empty(ENTRY, dtype=torch.bfloat16, device="cuda")
    assert _mallocs() == before + 2


def test_a_tier_larger_than_the_free_memory_shrinks_to_what_was_reserved(monkeypatch):
    from vllm_kvflow.store import device_reserve

    free = torch.cuda.mem_get_info()[0]
    headroom = max(device_reserve.MIN_HEADROOM_BYTES, torch.cuda.mem_get_info()[1] // 50)
    # Pretend the device has 1.5 GiB more than the headroom free.
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (headroom + (3 << 29), free + headroom))
    store = _store(64.0)
    assert store.reserve_device_memory() == 3 << 29
    assert store.tiers[0].capacity_bytes == 3 << 29

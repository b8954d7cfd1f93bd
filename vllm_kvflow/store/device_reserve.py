"""Device memory for the chunk store's entries, taken from the CUDA driver at engine
start instead of while serving.

Why: each newly computed chunk is stored as two fresh tensors (its keys and values).
While the device tier fills, PyTorch's caching allocator holds no free block of that
size and calls cudaMalloc for each. Measured on an H200 during a burst of store misses
(Llama-8B shape, `blend_stream` side; README, "Under load"): 6-7 cudaMalloc calls in
each step that stored entries, and every step whose connector host time reached 20 ms
(p90 ~41 ms) was one of them. The suspected cost: a device allocation is among the
operations that CUDA's programming guide lists as implicitly synchronizing streams, so
a small request's forward queued in such a step would wait for it; the probe's ~80 ms
outliers (3.3x its time alone, against ~35 ms in the other steps) fit that.

How: a private pool of the caching allocator (torch.cuda.MemPool). At engine start the
tier's capacity is allocated in it, in segments, and freed back into it at once; the
pool keeps the segments, and entries allocated inside `allocating()` are carved out of
them. The caching allocator hands a freed block only to allocations on the stream that
freed it, so the reservation is made on the stream the entries will be allocated on
(the blend stream, or vLLM's). Allocations on another stream, or past the reserve,
still work: the pool then asks the driver as before.

Off by default until measured on a GPU (KVFLOW_RESERVE_DEVICE_TIER=1 turns it on; see
`enabled`): built after the last device session of 2026-12-01 had ended.

A reservation leaves `headroom_bytes` of the device free (vLLM captures its CUDA graphs
after kvflow's start); what it cannot take is reported, and the caller shrinks the
tier to what was reserved.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger("vllm_kvflow.store")

SEGMENT_BYTES = 1 << 30
MIN_HEADROOM_BYTES = 2 << 30


def enabled() -> bool:
    """Whether engines reserve their device tier at start (KVFLOW_RESERVE_DEVICE_TIER=1)."""
    return os.environ.get("KVFLOW_RESERVE_DEVICE_TIER", "0") == "1"


def pools_supported() -> bool:
    return hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")


class DeviceReserve:
    """A private allocator pool on one CUDA device holding up to nbytes, reserved on
    `stream` (default: the current stream)."""

    def __init__(self, device, nbytes: int, stream=None, headroom_bytes: int | None = None):
        device = torch.device(device)
        # use_mem_pool and the stream need the index ("cuda" alone names none).
        self.device = device if device.index is not None \
            else torch.device("cuda", torch.cuda.current_device())
        self.stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        self.pool = torch.cuda.MemPool()
        free, total = torch.cuda.mem_get_info(self.device)
        headroom = headroom_bytes if headroom_bytes is not None \
            else max(MIN_HEADROOM_BYTES, total // 50)
        wanted = max(0, min(int(nbytes), free - headroom))
        self.nbytes = self._fill(wanted)

    def _fill(self, nbytes: int) -> int:
        """Allocate nbytes in the pool (stopping at the first failure) and free them
        back into it; returns what was taken."""
        held, taken = [], 0
        with torch.cuda.stream(self.stream), self.allocating():
            try:
                while taken < nbytes:
                    size = min(SEGMENT_BYTES, nbytes - taken)
                    held.append(torch.empty(size, dtype=torch.uint8, device=self.device))
                    taken += size
            except torch.OutOfMemoryError:
                pass
            del held
        return taken

    def allocating(self):
        """Context in which this thread's allocations on the device come from the pool."""
        return torch.cuda.use_mem_pool(self.pool, self.device)


def reserve_for(device, nbytes: int, stream=None) -> DeviceReserve | None:
    """A DeviceReserve of nbytes on a CUDA device; None on other devices, for nothing,
    or where this torch has no allocator pools."""
    if torch.device(device).type != "cuda" or nbytes <= 0:
        return None
    if not pools_supported():
        logger.info("kvflow: this torch has no CUDA allocator pools; the device tier's memory "
                    "is allocated as entries arrive")
        return None
    return DeviceReserve(device, nbytes, stream)


def allocating(reserve: DeviceReserve | None):
    """reserve.allocating(), or nothing to do without one."""
    return reserve.allocating() if reserve is not None else contextlib.nullcontext()

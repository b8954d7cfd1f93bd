"""One in-memory tier of the chunk store: an LRU bounded in bytes, on one device.

A tier never drops what it evicts: `put` returns the evicted entries so the store can
demote them to the next tier.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from vllm_kvflow.store.entry import ChunkKV


@dataclass
class TierCounters:
    hits: int = 0
    inserts: int = 0
    evictions: int = 0


@dataclass
class MemoryTier:
    """name: "device" or "host"; device: where entries are kept (None: as given)."""

    name: str
    capacity_bytes: int
    device: torch.device | str | None = None
    counters: TierCounters = field(default_factory=TierCounters)

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {self.capacity_bytes}")
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys_lru_order(self) -> list[str]:
        return list(self._entries)

    def fits(self, entry: ChunkKV) -> bool:
        return entry.nbytes <= self.capacity_bytes

    def get(self, key: str) -> ChunkKV | None:
        """The entry (no token check here), refreshed as most recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: ChunkKV) -> list[tuple[str, ChunkKV]]:
        """Insert as most recently used; returns the (key, entry) pairs evicted to fit.
        The caller checks fits() first."""
        if not self.fits(entry):
            raise ValueError(f"{self.name} tier: entry of {entry.nbytes} B exceeds capacity")
        self.pop(key)
        evicted = []
        while self._bytes + entry.nbytes > self.capacity_bytes:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.counters.evictions += 1
            evicted.append((old_key, old))
        self._entries[key] = entry.to(self.device)
        self._bytes += entry.nbytes
        self.counters.inserts += 1
        return evicted

    def pop(self, key: str) -> ChunkKV | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.nbytes,
                "capacity_bytes": self.capacity_bytes, **self.counters.__dict__}

"""Position-independent chunk KV store: byte-capacity LRU over per-chunk K/V tensors.

A chunk's identity is a hash of (model, namespace, sink, token ids) only, never of what
precedes it in a prompt, so the same document hits wherever it is placed. A hit verifies
the token ids, not only the hash.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


def chunk_key(model_id: str, namespace: str, sink_ids, token_ids) -> str:
    """Content hash of a chunk; position-independent by construction."""
    h = hashlib.sha256()
    for part in (model_id, namespace):
        h.update(part.encode())
        h.update(b"\0")
    h.update(np.asarray(sink_ids, dtype=np.int64).tobytes())
    h.update(b"\0")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class ChunkKV:
    """KV of one chunk computed in isolation behind the sink prefix.

    keys/values: [num_layers, T, num_kv_heads, head_dim]; keys are post-RoPE at the
    local positions local_start .. local_start + T - 1.
    """

    token_ids: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    local_start: int

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + (
            self.values.numel() * self.values.element_size()
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    rejected_too_large: int = 0
    hash_collisions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ChunkStore:
    """LRU store bounded in bytes. Not thread-safe: one per worker process."""

    capacity_bytes: int
    counters: StoreCounters = field(default_factory=StoreCounters)

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
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: str, token_ids) -> ChunkKV | None:
        """The entry for key if its token ids match exactly; refreshes its LRU rank."""
        entry = self._entries.get(key)
        if entry is not None and entry.token_ids != tuple(int(t) for t in token_ids):
            self.counters.hash_collisions += 1
            entry = None
        if entry is None:
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return entry

    def put(self, key: str, entry: ChunkKV) -> bool:
        """Insert (or replace) an entry, evicting LRU entries to fit. False if too big."""
        size = entry.nbytes
        if size > self.capacity_bytes:
            self.counters.rejected_too_large += 1
            return False
        self.discard(key)
        while self._bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.counters.evictions += 1
        self._entries[key] = entry
        self._bytes += size
        self.counters.inserts += 1
        return True

    def discard(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

"""KV of a prompt's glue: the tokens around the chunks (the chat header before the first
passage, the separators between passages).

Glue repeats across requests (one system prompt, one separator), so it is computed once,
like a chunk, and reused: a request whose chunks are all in the store then needs no
model pass at all before vLLM prefills the question. Glue at the very start of the
prompt is computed with nothing before it, so its KV is exact; glue elsewhere is
computed behind the sink, like a chunk, and is a recompute candidate like a chunk's
tokens (the separators carry much of the cross-passage information flow; see
docs/ARCHITECTURE.md, Methods).

A small LRU in worker memory, apart from the chunk store: glue is not a retrieved
document, costs little to recompute, and must not show in the store's counters or on disk.
"""
from __future__ import annotations

from vllm_kvflow.store.entry import ChunkKV
from vllm_kvflow.store.tiers import MemoryTier

# Bytes of glue KV kept per worker: thousands of separators and system prompts.
GLUE_CACHE_BYTES = 64 << 20


class GlueCache:
    """The chunk store's byte-bounded LRU (one MemoryTier, entries kept where they are
    given), keyed by tuples, that drops what it evicts: glue has no tier to demote to."""

    def __init__(self, capacity_bytes: int = GLUE_CACHE_BYTES):
        self._tier = MemoryTier("glue", capacity_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self._tier.capacity_bytes

    @property
    def nbytes(self) -> int:
        return self._tier.nbytes

    def __len__(self) -> int:
        return len(self._tier)

    def get(self, key: tuple) -> ChunkKV | None:
        """The entry, refreshed as most recently used."""
        return self._tier.get(key)

    def put(self, key: tuple, entry: ChunkKV) -> None:
        """Keep entry unless it is larger than the whole cache. A key already held keeps
        its entry: the same glue tokens give the same KV, so replacing it gains nothing."""
        if key in self._tier or not self._tier.fits(entry):
            return
        self._tier.put(key, entry)  # the evicted entries are dropped

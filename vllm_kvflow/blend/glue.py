"""KV of a prompt's glue: the tokens around the chunks (the chat header before the first
passage, the separators between passages).

Glue repeats across requests (one system prompt, one separator), so it is computed once,
like a chunk, and reused: a request whose chunks are all in the store then needs no
model pass at all before vLLM prefills the question. Glue at the very start of the
prompt is computed with nothing before it, so its KV is exact; glue elsewhere is
computed behind the sink, like a chunk, and is a recompute candidate like a chunk's
tokens (the separators carry much of the cross-passage information flow, DESIGN §2).

A small LRU in worker memory, apart from the chunk store: glue is not a retrieved
document, costs little to recompute, and must not show in the store's counters or on disk.
"""
from __future__ import annotations

from collections import OrderedDict

from vllm_kvflow.store import ChunkKV

# Bytes of glue KV kept per worker: thousands of separators and system prompts.
GLUE_CACHE_BYTES = 64 << 20


class GlueCache:
    def __init__(self, capacity_bytes: int = GLUE_CACHE_BYTES):
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple, ChunkKV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> ChunkKV | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: ChunkKV) -> None:
        if entry.nbytes > self.capacity_bytes or key in self._entries:
            return
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

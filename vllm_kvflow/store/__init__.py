from vllm_kvflow.store.chunk_store import ChunkStore, StoreCounters
from vllm_kvflow.store.entry import ChunkKV, chunk_key, int64_bytes, tenant_namespace
from vllm_kvflow.store.tiers import MemoryTier

__all__ = ["ChunkKV", "ChunkStore", "MemoryTier", "StoreCounters", "chunk_key", "int64_bytes",
           "tenant_namespace"]

from vllm_kvflow.store.chunk_store import (ChunkKV, ChunkStore, StoreCounters, chunk_key,
                                           tenant_namespace)
from vllm_kvflow.store.tiers import MemoryTier

__all__ = ["ChunkKV", "ChunkStore", "MemoryTier", "StoreCounters", "chunk_key", "tenant_namespace"]

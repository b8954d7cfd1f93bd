from vllm_kvflow.store.chunk_store import ChunkKV, ChunkStore, StoreCounters, chunk_key

__all__ = ["ChunkKV", "ChunkStore", "StoreCounters", "chunk_key"]

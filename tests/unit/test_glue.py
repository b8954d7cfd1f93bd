"""Glue (the prompt's tokens around the chunks): segments and the per-worker LRU."""
import torch

from vllm_kvflow.blend.glue import GlueCache
from vllm_kvflow.blend.pipeline import context_segments
from vllm_kvflow.store import ChunkKV


def entry(n_tokens: int) -> ChunkKV:
    kv = torch.zeros(2, n_tokens, 1, 4)  # 2 layers x tokens x 1 head x 4 dims, float32
    return ChunkKV(tuple(range(n_tokens)), kv, kv.clone(), local_start=1)


def test_segments_cover_the_context_in_order():
    assert context_segments([(5, 9), (11, 20)]) == [(0, 5, False), (5, 9, True),
                                                     (9, 11, False), (11, 20, True)]
    assert context_segments([(0, 3), (3, 7)]) == [(0, 3, True), (3, 7, True)]  # no glue


def test_glue_cache_is_lru_in_bytes():
    one = entry(2).nbytes  # 128 bytes
    cache = GlueCache(capacity_bytes=2 * one)
    cache.put(("ns", False, (1,)), entry(2))
    cache.put(("ns", False, (2,)), entry(2))
    assert cache.get(("ns", False, (1,))) is not None  # now the most recent
    cache.put(("ns", False, (3,)), entry(2))  # evicts (2,), the least recent
    assert cache.get(("ns", False, (2,))) is None
    assert cache.get(("ns", False, (1,))) is not None and len(cache) == 2
    assert cache.nbytes == 2 * one
    cache.put(("ns", False, (4,)), entry(10))  # larger than the cache: not kept
    assert cache.get(("ns", False, (4,))) is None and cache.nbytes == 2 * one


def test_glue_keys_separate_namespaces_and_prompt_start():
    cache = GlueCache()
    cache.put(("a", False, (7,)), entry(1))
    assert cache.get(("b", False, (7,))) is None  # another tenant computes its own
    assert cache.get(("a", True, (7,))) is None  # at the prompt's start: exact KV, not behind the sink


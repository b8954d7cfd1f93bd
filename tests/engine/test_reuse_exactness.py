"""The exact limits of chunk reuse, through the real engine on real weights."""
from __future__ import annotations

import pytest
import torch

from exactness import assert_all_recomputed, assert_identical, make_items, run_pair, run_rag
from vllm_kvflow.blend.selection import METHODS
from vllm_kvflow.request import STATS_KEY

pytestmark = pytest.mark.engine


# Every registered method that recomputes: a new method is held to the limit at once.
RECOMPUTING = [m.name for m in METHODS.values() if m.reuses and m.recomputes]


@pytest.mark.parametrize("method", RECOMPUTING)
def test_ratio_one_reproduces_full_prefill(generate, tokenizer, method):
    items = make_items(10 if method in ("random", "infoflow") else 3, seed=11)
    outs_full, outs_kv, prompts = run_pair(generate, tokenizer, items, method=method, ratio=1.0)
    for out in outs_full:
        assert out.kv_transfer_params[STATS_KEY]["method"] == "full"
    assert_all_recomputed(outs_kv, prompts)
    assert_identical(outs_full, outs_kv)


def test_same_chunks_in_another_order_hit_the_store(generate, tokenizer):
    items = make_items(4, seed=12)
    run_rag(generate, tokenizer, items, method="none", ratio=0.0)  # warm the store
    for it in items:
        it["passages"] = list(reversed(it["passages"]))
    outs_full, outs_kv, prompts = run_pair(generate, tokenizer, items, method="random", ratio=1.0)
    for out, prompt in zip(outs_kv, prompts):
        stats = out.kv_transfer_params[STATS_KEY]
        assert stats["chunks_hit"] == len(prompt.chunk_spans) and stats["chunks_missed"] == 0
    assert_identical(outs_full, outs_kv)


def test_chunk_right_after_sink_is_exact_without_recompute(generate, tokenizer):
    """[BOS][chunk][question]: the chunk sits where it was computed, behind the same sink,
    so plain reuse (ratio 0) is already exact."""
    bos = tokenizer.bos_token_id
    chunk = tokenizer.encode("Velmora is a harbor town whose lighthouse keeper is Ines Dovtal.",
                             add_special_tokens=False)
    question = tokenizer.encode("\nWho keeps the lighthouse of Velmora? Answer:", add_special_tokens=False)
    ids = [bos] + chunk + question
    span = [1, 1 + len(chunk)]
    full, reuse = generate([{"prompt_token_ids": ids}] * 2,
                           [{"kvflow": {"chunks": [{"span": span}], "method": "full"}},
                            {"kvflow": {"chunks": [{"span": span}], "method": "none", "ratio": 0.0}}])
    stats = reuse.kv_transfer_params[STATS_KEY]
    assert "chunks_exact" in stats, repr(stats)[-300:]
    assert stats["chunks_exact"] == 1 and stats["tokens_recomputed"] == 0
    assert stats["tokens_reused"] == len(chunk)
    assert_identical([full], [reuse])


def test_rerotated_layer0_keys_equal_keys_at_global_positions(worker, tokenizer):
    """Layer-0 keys depend on the token and its position only, so the stored keys
    re-rotated to the global positions must equal keys computed there directly;
    checked through both cache layouts (CPU_ATTN packed pages, FLASH_ATTN strides)."""
    from vllm_kvflow.blend.paged import DenseKV, PagedKV, split_kv_cache

    pipeline = worker._ready()
    chunk = tokenizer.encode("Quellport was founded by Ada Finch in 1742.", add_special_tokens=False)
    entry = pipeline.compute_isolated(chunk)
    shape = pipeline.adapter.shape
    offset = 37  # the chunk's start in some prompt
    filler = tokenizer.encode(" filler" * offset, add_special_tokens=False)[:offset]
    ids = torch.tensor(filler + chunk)
    direct = DenseKV.empty(pipeline.adapter.num_layers, len(ids), shape.num_kv_heads, shape.head_dim,
                           torch.float32, "cpu")
    pipeline.executor.prefill(ids, torch.arange(len(ids)), direct)
    expected = direct.keys[0, offset:]

    positions = torch.arange(offset, offset + len(chunk))
    offsets = torch.arange(len(chunk))
    # CPU_ATTN: the engine's real cache, in a block no request holds between tests.
    real = worker._paged_kv([worker._kv_caches[next(iter(worker._kv_caches))].shape[0] - 1], "cpu")
    # FLASH_ATTN: [blocks, H, N, 2D] logical with [blocks, N, H, 2D] strides.
    flash_raw = torch.zeros(2, 64, shape.num_kv_heads, 2 * shape.head_dim).transpose(1, 2)
    fk, fv = split_kv_cache(flash_raw, "flash", shape.head_dim)
    flash = PagedKV([fk] * pipeline.adapter.num_layers, [fv] * pipeline.adapter.num_layers,
                    torch.tensor([1]), block_size=64)
    for kv in (real, flash):
        delta = positions - (offsets + entry.local_start)
        kv.load_rotated(0, positions, entry.keys[0], entry.values[0], delta,
                        pipeline.cos_sin, pipeline.rotary_dim, pipeline.is_neox)
        keys, values = kv.read(0, offset + len(chunk))
        err = (keys[offset:] - expected).abs().max().item()
        assert err < 5e-5, err  # float32 rotation by delta vs rotation at the position
        assert torch.equal(values[offset:], entry.values[0])


def test_cpu_pages_read_back_what_vllms_op_wrote_and_attend_at_scattered_positions(worker):
    """The recompute's K/V go into CPU_ATTN's packed pages through vLLM's own write op;
    read() gives them back exactly (a reshape of the layout this machine's ISA packs),
    and attention at scattered, clustered and contiguous query positions equals masked
    attention over the K/V as written (not as read back)."""
    from vllm_kvflow.blend.attention import masked_attention
    from vllm_kvflow.blend.paged import page_order

    kv = worker._paged_kv([7, 3, 9, 5], torch.device("cpu"))  # free blocks of the idle engine
    shape = worker._pipeline.adapter.shape
    length = 3 * kv.block_size + 17
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(length, shape.num_kv_heads, shape.head_dim, generator=gen)
    values = torch.randn(length, shape.num_kv_heads, shape.head_dim, generator=gen)
    kv.write(0, torch.arange(length), keys, values)
    read_keys, read_values = kv.read(0, length)
    assert torch.equal(read_keys, keys) and torch.equal(read_values, values)
    assert (kv.key_order, kv.value_order) == (page_order(kv.key_index), page_order(kv.value_index))
    print("page orders (key, value):", kv.key_order, kv.value_order)
    for positions in (torch.tensor([0, 5, 6, 7, 100, 101, 250, length - 1]),
                      torch.randperm(length, generator=gen)[:90].sort().values,
                      torch.arange(length - 40, length)):
        end = int(positions[-1]) + 1
        q = torch.randn(positions.numel(), shape.num_heads, shape.head_dim, generator=gen)
        got = kv.attend(0, q, positions, end, shape.scale)
        want = masked_attention(q, keys[:end], values[:end], positions, torch.arange(end), shape.scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

"""After the pipeline's warm-up at engine start, serving compiles no Triton kernel: the
scoring and recompute passes (lone and batched, captured and eager), isolated computes
and chunk loads of many other sizes add no entry to any kernel's compile cache."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from toy_decoder import Toy  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _compiled() -> dict[str, int]:
    """Compiled variants per serving kernel (Triton's per-device compile caches)."""
    from vllm_kvflow.kernels import attn_norm, chunk_load, partial_attention

    kernels = {"_partial_attention_kernel": partial_attention._partial_attention_kernel,
               "_merge_splits_kernel": partial_attention._merge_splits_kernel,
               "_row_lse_kernel": attn_norm._row_lse_kernel,
               "_column_norm_kernel": attn_norm._column_norm_kernel,
               "_load_chunk_kv_kernel": chunk_load._load_chunk_kv_kernel}
    out = {}
    for name, fn in kernels.items():
        caches = getattr(fn, "device_caches", None)
        out[name] = sum(len(c[0]) for c in caches.values()) if caches else len(getattr(fn, "cache", {}))
    return out


def test_warm_up_compiles_everything_serving_launches():
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV, split_kv_cache
    from vllm_kvflow.blend.pass_graphs import PrefillItem, ScoreItem
    from vllm_kvflow.blend.pipeline import BlendPipeline
    from vllm_kvflow.config import KVFlowConfig
    from vllm_kvflow.store import ChunkKV, ChunkStore

    dtype, Hq, Hkv, D, BS, NB = torch.bfloat16, 32, 8, 128, 16, 1200
    toy = Toy(Hq, Hkv, D, hidden=64)
    toy.proj, toy.mix = (0.1 * toy.proj).cuda().to(dtype), (0.1 * toy.mix).cuda().to(dtype)
    toy.model = toy.model.cuda().to(dtype)
    embed = toy.embed
    toy.embed = lambda ids: embed(ids).to(dtype)
    raw = torch.randn(NB, BS, Hkv, 2 * D, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = split_kv_cache(raw, "flash", D)
    keys, values = [k] + [k.clone() for _ in range(2)], [v] + [v.clone() for _ in range(2)]
    pipeline = BlendPipeline(LayerwiseExecutor(toy), ChunkStore(1 << 30), KVFlowConfig(scoring_layers=(1, 2)),
                             "toy", (1,))
    pipeline.warm_up(keys, values, BS)
    warm = _compiled()
    assert all(warm.values()), warm  # every kernel ran at warm-up

    gen = torch.Generator().manual_seed(0)
    graphs = pipeline.pass_graphs_for(PagedKV(keys, values, torch.arange(1, 2, device="cuda"), BS))
    for trial in range(6):
        B = [1, 3, 7, 16, 2, 5][trial]
        blocks = [(torch.randperm(NB - 1, generator=gen)[:700] + 1).cuda() for _ in range(B)]
        contexts = [int(x) for x in torch.randint(17, 9000, (B,), generator=gen)]
        qlens = [int(x) for x in torch.randint(1, 70, (B,), generator=gen)]
        graphs.score_batch([ScoreItem(torch.arange(n, device="cuda"), c + 1, c, b)
                            for n, c, b in zip(qlens, contexts, blocks)])
        items = []
        for c, b in zip(contexts, blocks):
            n = int(torch.randint(1, max(2, c // 5), (1,), generator=gen))
            pos = torch.randperm(c, generator=gen)[:n].sort().values.cuda()
            items.append(PrefillItem(pos % 500, pos, c, b))
        graphs.prefill_batch(items)
        pipeline.executor.prefill_groups([])  # nothing
        from vllm_kvflow.blend.executor import RowGroup

        pipeline.executor.prefill_groups([RowGroup(it.ids, it.positions, PagedKV(keys, values, b, BS))
                                          for it, b in zip(items[:2], blocks[:2])])
        lengths = [int(x) for x in torch.randint(1, 600, (3,), generator=gen)]
        pipeline.compute_isolated_many([(tuple(range(n)), (1,)) for n in lengths])  # one buffer
        pipeline.compute_isolated_many([(tuple(range(lengths[0])), (1,))])  # alone
        # A long compute in slices: a few rows over thousands of keys (where the
        # partial attention would otherwise split its keys).
        from vllm_kvflow.blend.pipeline import IsolatedCompute

        (run,) = pipeline.start_isolated([IsolatedCompute(None, tuple(range(2100 + trial)), (1,), True)])
        pipeline.advance_isolated([(run, run.rows_left - 5)])
        pipeline.advance_isolated([(run, 5)])
        kv = PagedKV(keys, values, blocks[0], BS)
        loads, cursor = [], 5
        for n in lengths:
            e = ChunkKV(tuple(range(n)), torch.zeros(3, n, Hkv, D, device="cuda", dtype=dtype),
                        torch.zeros(3, n, Hkv, D, device="cuda", dtype=dtype), 1)
            loads.append((e, 0, cursor, cursor, cursor + n))
            cursor += n + 1
        pipeline._write_chunks(loads, kv)
    torch.cuda.synchronize()
    assert _compiled() == warm

"""Isolated computes sharing one buffer (blend/dense_batch.py: one write and one
partial-attention launch per layer for all of them) against each computed alone in a
private buffer, with the Triton kernels on the GPU: 40 chunks of 1..600 rows (two
launches), in two slices each."""
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_buffers_equal_private_buffers_on_the_gpu(dtype):
    from vllm_kvflow.blend.dense_batch import SharedBatch, attention_plan, dense_kv_many
    from vllm_kvflow.blend.executor import LayerwiseExecutor, RowGroup
    from vllm_kvflow.blend.paged import DenseKV

    Hq, Hkv, D = 32, 8, 128
    toy = Toy(Hq, Hkv, D, hidden=64)
    toy.proj, toy.mix = (0.3 * toy.proj).to("cuda", dtype), (0.3 * toy.mix).to("cuda", dtype)
    embed = toy.embed
    toy.embed = lambda ids: embed(ids).to(dtype)
    ex = LayerwiseExecutor(toy)
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 600, (40,), generator=gen)]
    seqs = [torch.randint(0, 1000, (n,), generator=gen).cuda() for n in lengths]
    shared = dense_kv_many(3, lengths, Hkv, D, dtype, "cuda")
    private = [DenseKV.empty(3, n, Hkv, D, dtype, "cuda") for n in lengths]
    halves = [n // 2 for n in lengths]
    for spans in (list(zip([0] * 40, halves)), list(zip(halves, lengths))):
        groups = [RowGroup(ids[a:b], torch.arange(a, b, device="cuda"), buf, length=b)
                  for ids, (a, b), buf in zip(seqs, spans, shared) if b > a]
        assert all(isinstance(u, SharedBatch) for u in attention_plan(groups, [(0, 0)] * len(groups)))
        ex.prefill_groups(groups)
        for ids, (a, b), buf in zip(seqs, spans, private):
            if b > a:
                ex.prefill_groups([RowGroup(ids[a:b], torch.arange(a, b, device="cuda"), buf)])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for s, p in zip(shared, private):
        torch.testing.assert_close(s.keys, p.keys, **tol)
        torch.testing.assert_close(s.values, p.values, **tol)

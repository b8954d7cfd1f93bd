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


Hq, Hkv, D = 32, 8, 128


def _toy_executor(dtype):
    """The executor over a toy decoder on the GPU, Llama-8B's attention shape."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    toy = Toy(Hq, Hkv, D, hidden=64)
    toy.proj, toy.mix = (0.3 * toy.proj).to("cuda", dtype), (0.3 * toy.mix).to("cuda", dtype)
    embed = toy.embed
    toy.embed = lambda ids: embed(ids).to(dtype)
    return LayerwiseExecutor(toy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_buffers_equal_private_buffers_on_the_gpu(dtype):
    from vllm_kvflow.blend.dense_batch import SharedBatch, attention_plan, dense_kv_many
    from vllm_kvflow.blend.executor import RowGroup
    from vllm_kvflow.blend.paged import DenseKV

    ex = _toy_executor(dtype)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_captured_arena_passes_equal_private_buffers_without_waiting(dtype):
    """The isolated arena (blend/isolated_arena.py): its passes, captured at start for
    every bucket up to 1024 rows, give the same K/V as each compute alone in a private
    buffer (40 chunks of 1..600 rows over scattered pages, in two slices, so many passes
    of up to 31 computes), and queue their work without a host sync."""
    from vllm_kvflow.blend.executor import RowGroup
    from vllm_kvflow.blend.isolated_arena import IsolatedArena
    from vllm_kvflow.blend.paged import DenseKV

    ex = _toy_executor(dtype)
    arena = IsolatedArena(ex, 3, 16384, Hkv, D, dtype, "cuda", capture=True)
    assert arena.capture(1024) > 0
    graphs = dict(arena.graphs._entries)
    assert all(graph is not None for _, graph in graphs.values()), "capture failed"
    gen = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(1, 600, (40,), generator=gen)]
    seqs = [torch.randint(0, 1000, (n,), generator=gen).cuda() for n in lengths]
    holes = [arena.allocate(int(n)) for n in torch.randint(1, 100, (20,), generator=gen)]
    for hole in holes[::2]:
        hole.release()  # free pages scattered between taken ones
    kvs = [arena.allocate(n) for n in lengths]
    private = [DenseKV.empty(3, n, Hkv, D, dtype, "cuda") for n in lengths]
    halves = [n // 2 for n in lengths]
    for first in (True, False):
        pieces = [(kv, ids[:h], 0) if first else (kv, ids[h:], h)
                  for kv, ids, h in zip(kvs, seqs, halves) if (h if first else ids.numel() - h)]
        # Each slice's pieces take at most 1024 rows, so that they replay the graphs.
        batch, rows = [], 0
        for piece in pieces + [None]:
            if piece is None or rows + piece[1].numel() > 1024:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    arena.advance(batch)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                batch, rows = [], 0
            if piece is not None:
                batch.append(piece)
                rows += piece[1].numel()
        for ids, buf, h in zip(seqs, private, halves):
            a, b = (0, h) if first else (h, ids.numel())
            if b > a:
                ex.prefill_groups([RowGroup(ids[a:b], torch.arange(a, b, device="cuda"), buf)])
    assert arena.graphs._entries.keys() == graphs.keys(), "a pass met a bucket not captured at start"
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for kv, p, n in zip(kvs, private, lengths):
        keys, values = kv.copy_rows(0, n)
        torch.testing.assert_close(keys, p.keys, **tol)
        torch.testing.assert_close(values, p.values, **tol)

"""The in-place segment load (chunk_load.load_chunk_kv_segments) under TRITON_INTERPRET=1.

The engine's GPU path writes a request's chunks straight from each chunk's own store
tensors through a per-token offset table (no gathered copy). Checked here against the
torch reference applied to the gathered sources, on separate allocations with skipped
leading tokens, several layers whose caches are separate tensors, both RoPE styles; and
the pipeline's two write paths (in place, gathered) against each other.
"""
from __future__ import annotations

import types

import pytest
import torch

import vllm_kvflow.kernels.chunk_load as cl
from interpreter_child import require_interpreter_child, run_interpreter_child


def test_segment_load_under_triton_interpreter():
    """Run this file's ``test_interp_*`` tests in a TRITON_INTERPRET=1 child pytest."""
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_segment_load_under_triton_interpreter")
    return types.SimpleNamespace(cl=cl)


def _rope_cache(max_pos: int, rotary_dim: int) -> torch.Tensor:
    freqs = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), freqs)
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


def _flash_layers(L, NB, BS, H, D):
    """L separate FLASH_ATTN-layout caches (K|V on the last dim), poisoned with NaN."""
    raws = [torch.full((NB, BS, H, 2 * D), float("nan")) for _ in range(L)]
    return raws, [r[..., :D] for r in raws], [r[..., D:] for r in raws]


@pytest.mark.parametrize("is_neox", [True, False])
def test_interp_segments_equal_gathered_reference(interp, is_neox):
    torch.manual_seed(11)
    L, H, D, NB, BS = 3, 2, 64, 10, 8
    rope = _rope_cache(400, D)
    # Three chunks in separate allocations; the second is loaded from its 4th token on.
    chunks = [(torch.randn(L, n, H, D), torch.randn(L, n, H, D)) for n in (9, 13, 5)]
    segments = [(k, v, skip, k.shape[1] - skip) for (k, v), skip in zip(chunks, (0, 3, 0))]
    T = sum(s[3] for s in segments)
    slots = torch.randperm(NB * BS)[:T]
    slots[4] = -1  # skipped token: nothing written for it
    delta = torch.randint(-300, 300, (T,))
    raws, keys, values = _flash_layers(L, NB, BS, H, D)
    interp.cl.load_chunk_kv_segments(segments, keys, values, slots, delta, rope, D, is_neox)

    gathered_k = torch.cat([k[:, s:] for k, _, s, _ in segments], 1)
    gathered_v = torch.cat([v[:, s:] for _, v, s, _ in segments], 1)
    refs, ref_k, ref_v = _flash_layers(L, NB, BS, H, D)
    for layer in range(L):
        cl.load_chunk_kv_reference(gathered_k[layer], gathered_v[layer], ref_k[layer],
                                   ref_v[layer], slots, delta, rope, D, is_neox)
        assert torch.equal(raws[layer].isnan(), refs[layer].isnan())
        torch.testing.assert_close(raws[layer].nan_to_num(0), refs[layer].nan_to_num(0),
                                   atol=1e-6, rtol=0)
    assert (~raws[0].isnan()).sum() == 2 * (T - 1) * H * D


def test_interp_segments_refuse_what_they_cannot_read(interp):
    L, H, D = 2, 2, 64
    _, keys, values = _flash_layers(L, 4, 8, H, D)
    rope = _rope_cache(64, D)
    k = torch.randn(L, 6, H, D)
    bad = [(k.transpose(0, 1).contiguous().transpose(0, 1), k.clone(), 0, 6)]  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        interp.cl.load_chunk_kv_segments(bad, keys, values, torch.arange(6), torch.zeros(6, dtype=torch.long),
                                         rope, D, True)
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \[6\]"):
        interp.cl.load_chunk_kv_segments([(k, k.clone(), 0, 6)], keys, values, torch.arange(5),
                                         torch.zeros(5, dtype=torch.long), rope, D, True)


def test_interp_pipeline_in_place_write_equals_gathered_write(interp):
    """BlendPipeline._write_in_place (kernel path) and _write_gathered (torch path) put
    the same KV in the request's blocks."""
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pipeline import BlendPipeline
    from vllm_kvflow.store import ChunkKV

    torch.manual_seed(12)
    L, H, D, NB, BS = 2, 2, 64, 12, 8
    rope = _rope_cache(400, D)
    entries = [ChunkKV(tuple(range(n)), torch.randn(L, n, H, D), torch.randn(L, n, H, D), 1)
               for n in (7, 11, 4)]
    loads, cursor = [], 2
    for e, skip in zip(entries, (0, 2, 0)):
        n = e.num_tokens
        loads.append((e, skip, cursor, cursor + skip, cursor + n))
        cursor += n + 1
    pipe = types.SimpleNamespace(adapter=types.SimpleNamespace(device=torch.device("cpu"), num_layers=L),
                                 cos_sin=rope, rotary_dim=D, is_neox=True)
    out = []
    for method in (BlendPipeline._write_in_place, BlendPipeline._write_gathered):
        raws, keys, values = _flash_layers(L, NB, BS, H, D)
        kv = PagedKV(keys, values, torch.tensor([5, 1, 9, 3, 7, 0]), BS)
        positions = torch.cat([torch.arange(f, c1) for *_, f, c1 in loads])
        delta = torch.cat([torch.full((c1 - f,), c0 - e.local_start) for e, _, c0, f, c1 in loads])
        method(pipe, loads, kv, positions, delta, rope)
        out.append(torch.stack(raws))
    assert torch.equal(out[0].isnan(), out[1].isnan())
    torch.testing.assert_close(out[0].nan_to_num(0), out[1].nan_to_num(0), atol=1e-6, rtol=0)


def test_interp_a_load_the_kernel_refuses_is_gathered_warned_and_counted(interp, caplog):
    """An entry the fused kernel cannot read in place (not contiguous) is written by the
    gather instead: same KV, one warning, and _write_chunks says it fell back (the
    pipeline counts it as kernel_fallbacks in the stats and on /metrics)."""
    import logging

    from vllm_kvflow.blend import pipeline as pl
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.store import ChunkKV

    torch.manual_seed(3)
    L, H, D, NB, BS, n = 2, 2, 64, 6, 8, 9
    rope = _rope_cache(64, D)
    k = torch.randn(n, L, H, D).transpose(0, 1)  # [L, n, H, D], not contiguous
    entry = ChunkKV(tuple(range(n)), k, torch.randn(L, n, H, D), 1)
    pipe = types.SimpleNamespace(adapter=types.SimpleNamespace(device=torch.device("cpu"), num_layers=L),
                                 cos_sin=rope, rotary_dim=D, is_neox=True,
                                 _write_in_place=lambda *a: pl.BlendPipeline._write_in_place(pipe, *a),
                                 _write_gathered=lambda *a: pl.BlendPipeline._write_gathered(pipe, *a))
    loads = [(entry, 0, 3, 3, 3 + n)]
    out = []
    for contiguous in (False, True):
        if contiguous:
            loads = [(ChunkKV(entry.token_ids, k.contiguous(), entry.values, 1), 0, 3, 3, 3 + n)]
        raws, keys, values = _flash_layers(L, NB, BS, H, D)
        kv = PagedKV(keys, values, torch.tensor([4, 1, 5, 2]), BS)
        pl._warned.clear()
        with caplog.at_level(logging.WARNING, logger="vllm_kvflow"):
            caplog.clear()
            assert pl.BlendPipeline._write_chunks(pipe, loads, kv) is contiguous
        assert ("refused a load" in caplog.text) is not contiguous
        out.append(torch.stack(raws))
    assert torch.equal(out[0].isnan(), out[1].isnan())
    torch.testing.assert_close(out[0].nan_to_num(0), out[1].nan_to_num(0), atol=1e-6, rtol=0)

"""HilbertA Triton kernel under TRITON_INTERPRET=1 against the float32 dense reference
under the same mask, at small sizes (the interpreter is slow; the file runs in well under
60 s on 2 cores), plus the host wrapper's validation errors and the mask definition.

TRITON_INTERPRET must be set before triton is imported (Triton's own @jit helpers such as
tl.zeros are built at that import), and must not leak into other test modules. So the
kernel tests (named test_interp_*) run in a child pytest of this file whose environment
has TRITON_INTERPRET=1 from the start; in the parent they are skipped and
test_kernel_under_triton_interpreter runs the child and asserts that it passed.
"""
from __future__ import annotations


import pytest
import torch

from vllm_kvflow.kernels.hilbert_attention import (hilbert_attention_mask,
                                                   hilbert_attention_reference, pair_count)
from vllm_kvflow.vision.hilbert import hilbert_layout, sliding_offset

from interpreter_child import require_interpreter_child, run_interpreter_child


def test_kernel_under_triton_interpreter():
    last = run_interpreter_child(__file__)
    assert "deselected" in last, last


@pytest.fixture(scope="module")
def ha():
    """The kernel module, built with TRITON_INTERPRET=1 (only inside the child run)."""
    require_interpreter_child("test_kernel_under_triton_interpreter")
    import vllm_kvflow.kernels.hilbert_attention as module

    return module


def _rel(a, b):
    return float((a.float() - b).norm() / b.norm())


# (batch, heads, n_tokens, head_dim, n_shared, tile_size, offset, dtype, BLOCK_M, BLOCK_N)
# fp16, not bf16: the interpreter (Triton 3.9) mis-computes a tl.dot fed by an in-kernel
# float32 -> bf16 cast (seen here: outputs ~1e9); bf16 is covered by tests/gpu.
CASES = [
    (1, 2, 100, 80, 20, 24, 5, torch.float32, 16, 16),    # head_dim 80, g % BLOCK_M != 0
    (2, 1, 77, 32, 0, 77, 0, torch.float32, 32, 16),      # no shared, one tile (dense)
    (1, 1, 130, 64, 33, 20, 17, torch.float16, 16, 32),   # S, g not multiples of blocks
    (1, 1, 96, 16, 32, 16, 0, torch.float32, 16, 16),     # everything divisible
    (1, 2, 90, 48, 10, 79, 78, torch.float32, 32, 32),    # window wraps by 77 of 80 local
    (1, 1, 70, 80, 69, 1, 0, torch.float32, 16, 16),      # one local token
    (1, 1, 64, 32, 5, 3, 2, torch.float16, 16, 16),       # tiny tiles, many tiles per block
    (2, 2, 120, 24, 1, 37, 36, torch.float32, 32, 16),    # head_dim 24 (pads to 32)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[2]}-D{c[3]}-S{c[4]}-g{c[5]}-o{c[6]}")
def test_interp_kernel_matches_reference(ha, case):
    b, h, n, d, s, g, off, dtype, bm, bn = case
    gen = torch.Generator().manual_seed(n * 1000 + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    ha.hilbert_attention(q, k, v, s, g, off, out=out, config=dict(BLOCK_M=bm, BLOCK_N=bn))
    assert not torch.isnan(out).any(), "unwritten output rows"
    ref = hilbert_attention_reference(q, k, v, s, g, off)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(out, ref) < tol


def test_interp_real_layout_strided_and_sliding(ha):
    """A 9x11 image with 6 text tokens, 3 tiles; q/k/v as strided [B, N, H, D] views."""
    lay = hilbert_layout(9, 11, text_tokens=6, tiles=3)
    x = torch.randn(3, 1, lay.n_tokens, 2, 80)
    q, k, v = (x[i].transpose(1, 2) for i in range(3))
    for layer in (0, 1, 3):
        off = sliding_offset(lay.tile_size, layer)
        out = ha.hilbert_attention(q, k, v, lay.n_shared, lay.tile_size, off)
        ref = hilbert_attention_reference(q, k, v, lay.n_shared, lay.tile_size, off)
        assert _rel(out, ref) < 1e-5


def test_interp_default_config_runs(ha):
    q, k, v = (torch.randn(1, 1, 50, 32) for _ in range(3))
    out = ha.hilbert_attention(q, k, v, 10, 13, 4)
    assert _rel(out, hilbert_attention_reference(q, k, v, 10, 13, 4)) < 1e-5


def test_mask_definition():
    m = hilbert_attention_mask(10, 2, 3, offset=2)       # 8 local tokens, tiles of 3
    assert m[:2].all() and m[:, :2].all()                 # shared rows and columns
    # local query 0 (tile 0): window local[2:5]; local query 7 (tile 2): local[8:11] mod 8
    assert m[2, 2:].tolist() == [False, False, True, True, True, False, False, False]
    assert m[9, 2:].tolist() == [True, True, True, False, False, False, False, False]
    assert int(m[2:, 2:].sum(1).unique().item()) == 3     # every local row sees g keys
    assert int(m.sum()) == pair_count(10, 2, 3)


def test_reference_one_tile_is_dense():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    ref = hilbert_attention_reference(q, k, v, 0, 40, 7)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert _rel(ref, dense) < 1e-5


def test_pair_count_matches_design():
    # Pair-count bound against dense attention with 512 text tokens, 4 / 16 tiles:
    # 1024^2 image (4096 tokens) -> 2.09x / 2.87x; 2048^2 (16384) -> 2.63x / 4.44x
    for (h, text), want in (((64, 512), (2.09, 2.87)), ((128, 512), (2.63, 4.44))):
        got = []
        for tiles in (4, 16):
            lay = hilbert_layout(h, h, text, tiles)
            got.append(lay.n_tokens ** 2 / pair_count(lay.n_tokens, lay.n_shared, lay.tile_size))
        assert [round(x, 2) for x in got] == list(want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_shared=64, tile_size=4), "n_shared"),            # no local token left
    (dict(n_shared=-1, tile_size=4), "n_shared"),
    (dict(n_shared=8, tile_size=0), "tile_size"),
    (dict(n_shared=8, tile_size=57), "tile_size"),           # longer than N_local
    (dict(n_shared=8, tile_size=4, offset=-1), "offset"),
    (dict(n_shared=8, tile_size=4, config=dict(BLOCK_M=48, BLOCK_N=16)), "BLOCK_M"),
    (dict(n_shared=8, tile_size=4, config=dict(BLOCK_M=16)), "config"),
])
def test_interp_host_validation(ha, kwargs, match):
    q, k, v = (torch.randn(1, 1, 64, 32) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        ha.hilbert_attention(q, k, v, **kwargs)


def test_interp_host_validation_tensors(ha):
    q = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="shape"):
        ha.hilbert_attention(q, q[:, :, :32], q, 8, 4)
    with pytest.raises(ValueError, match="dtype"):
        ha.hilbert_attention(q, q.half(), q, 8, 4)
    with pytest.raises(ValueError, match="dtype"):
        ha.hilbert_attention(q.double(), q.double(), q.double(), 8, 4)
    with pytest.raises(ValueError, match="contiguous head dim"):
        t = torch.randn(1, 1, 32, 64).transpose(-1, -2)
        ha.hilbert_attention(t, t, t, 8, 4)
    with pytest.raises(ValueError, match="head_dim"):
        t = torch.randn(1, 1, 64, 300)
        ha.hilbert_attention(t, t, t, 8, 4)
    with pytest.raises(TypeError):
        ha.hilbert_attention(q, q, q, 8.0, 4)


@pytest.mark.parametrize("n,s,g,off", [(100, 20, 24, 5), (77, 0, 77, 0), (90, 10, 79, 78),
                                       (70, 69, 1, 0)])
def test_sdpa_path_matches_reference(n, s, g, off):
    """The vision hook's CPU path (per-tile SDPA, no N x N mask) equals the reference."""
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention_sdpa

    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    ref = hilbert_attention_reference(q, k, v, s, g, off)
    assert _rel(hilbert_attention_sdpa(q, k, v, s, g, off), ref) < 1e-5


def test_merged_segment_one_tile_no_shared_is_dense():
    """A Qwen2.5-VL-like segment (10x6 units of 4 patches, window order) permuted into the
    layout with one tile and no shared region, attended, and permuted back = dense."""
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention_sdpa
    from vllm_kvflow.vision.hilbert import merged_segment_layout

    wi = torch.randperm(60).numpy()
    seg = merged_segment_layout(10, 6, wi, merge_unit=4, tiles=1, central_fraction=0.0)
    assert seg.n_shared == 0 and seg.tile_size == 240
    q, k, v = (torch.randn(1, 2, 240, 16) for _ in range(3))
    order, inverse = torch.from_numpy(seg.order.copy()), torch.from_numpy(seg.inverse.copy())
    out = hilbert_attention_sdpa(q[:, :, order], k[:, :, order], v[:, :, order],
                                 seg.n_shared, seg.tile_size, 3)[:, :, inverse]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert _rel(out, dense) < 1e-5

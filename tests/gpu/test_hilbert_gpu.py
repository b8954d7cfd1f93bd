"""HilbertA Triton kernel on a CUDA GPU: exact against float32 dense attention under the
same boolean mask, on fresh random inputs, for many shapes (non-divisible tile sizes,
shared counts not multiples of the block, head_dim 80, wrapped windows, batch > 1).
Outputs are poisoned with NaN before each run so an unwritten row fails the check."""
from __future__ import annotations

import pytest
import torch

from vllm_kvflow.kernels.hilbert_attention import hilbert_attention, hilbert_attention_reference
from vllm_kvflow.vision.hilbert import hilbert_layout, sliding_offset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# bf16/fp16 operands, fp32 accumulation: ~1e-3..1e-2 relative; fp32 ("ieee" dots): ~1e-6.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}

# (batch, heads, n_tokens, head_dim, n_shared, tile_size, offset)
SHAPES = [
    (1, 2, 1024, 128, 128, 224, 0),
    (1, 3, 1000, 128, 77, 100, 31),      # nothing divisible
    (2, 2, 777, 80, 65, 143, 140),       # head_dim 80, wrapped window
    (1, 4, 2304, 64, 256, 256, 64),
    (1, 2, 513, 80, 0, 513, 0),          # no shared, one tile: dense
    (1, 1, 300, 32, 299, 1, 0),          # one local token
    (2, 1, 640, 128, 1, 17, 5),          # tiny tiles, 17 not a multiple of any block
    (1, 2, 4608, 128, 768, 240, 180),    # Flux 1024^2, 16 tiles, layer 3 of the cycle
    (1, 2, 4096, 80, 256, 960, 480),     # ViT 64x64, 4 tiles
    (1, 1, 1111, 256, 100, 333, 7),      # head_dim 256
    (1, 2, 900, 96, 45, 855, 854),       # one tile minus nothing: window wraps by 854
]

# Other launch configurations (the default is 64 x 64): block sizes that divide neither
# n_shared nor tile_size, tiny blocks, and the sweep's 128-row configuration.
CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
           dict(BLOCK_M=16, BLOCK_N=32, num_warps=2, num_stages=1)]


def _rel(a, b):
    return float((a.float() - b).norm() / b.norm())


def _check(shape, dtype, config=None):
    b, h, n, d, s, g, off = shape
    gen = torch.Generator(device="cuda").manual_seed(hash((shape, str(dtype))) % 2**31)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen).to(dtype) for _ in range(3))
    ref = hilbert_attention_reference(q, k, v, s, g, off)
    out = torch.full_like(q, float("nan"))       # poison: every row must be written
    hilbert_attention(q, k, v, s, g, off, out=out, config=config)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"unwritten output rows with config {config}"
    err = _rel(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3g} with config {config}"


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_dense_under_mask(shape):
    _check(shape, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[6], SHAPES[10]])
def test_other_dtypes(shape, dtype):
    _check(shape, dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=["128x128", "16x32"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[7]])
def test_other_configs(shape, config):
    _check(shape, torch.bfloat16, config)


def test_strided_inputs_and_layout_roundtrip():
    """[B, N, H, D] memory viewed as [B, H, N, D]; a real layout with sliding offsets."""
    lay = hilbert_layout(48, 40, text_tokens=100, tiles=16)
    n = lay.n_tokens
    x = torch.randn(3, 2, n, 4, 80, device="cuda", dtype=torch.bfloat16)  # [3, B, N, H, D]
    q, k, v = (x[i].transpose(1, 2) for i in range(3))                     # strided views
    for layer in range(4):
        off = sliding_offset(lay.tile_size, layer)
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
        hilbert_attention(q, k, v, lay.n_shared, lay.tile_size, off, out=out)
        ref = hilbert_attention_reference(q, k, v, lay.n_shared, lay.tile_size, off)
        assert _rel(out, ref) < TOL[torch.bfloat16]


def test_one_tile_no_shared_equals_sdpa():
    q, k, v = (torch.randn(2, 4, 1500, 80, device="cuda", dtype=torch.float16) for _ in range(3))
    out = hilbert_attention(q, k, v, 0, 1500, 0)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel(out, ref) < TOL[torch.float16]

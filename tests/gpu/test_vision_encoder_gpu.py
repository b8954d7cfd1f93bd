"""HilbertA in Qwen2.5-VL's vision encoder on a CUDA GPU, bf16, Qwen2.5-VL-7B vision shapes
(16 heads x 80, hidden 1280, patch 14, merge 2, window 112, full-attention blocks 7, 15,
23, 31; benchmarks/gpu/configs/qwen2.5-vl-7b.json):

  * the attention of a full-attention block (Triton kernel, gathers and scatters between
    the encoder's window order and the Hilbert layout) equals dense attention under the
    same mask, for a 1024^2 image's grid, non-square and odd grids, several images and a
    two-frame item, every position of the sliding schedule;
  * with vLLM 0.26 staged (skipped otherwise): vLLM's own window order is the one the
    layouts assume; vLLM's encoder, built with random weights, gives the same output of
    a full-attention block and of the whole encoder with the Triton path as with the
    masked dense reference in those blocks; one tile without a central block reproduces
    the stock encoder (FlashAttention) output.
Run: bash benchmarks/gpu/env.sh python3 -m pytest tests/gpu/test_vision_encoder_gpu.py -q
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from vllm_kvflow.vision.encoder_attention import (EncoderContext, HilbertASettings,
                                                  HilbertEncoderAttention, encoder_attention,
                                                  masked_dense_reference, plan_segments,
                                                  window_unit_order)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = Path(__file__).resolve().parents[2] / "benchmarks/gpu/configs/qwen2.5-vl-7b.json"
HEADS, HEAD_DIM, MERGE, WINDOW_UNITS = 16, 80, 2, 4
BF16_TOL = 1.5e-2  # bf16 operands, fp32 accumulation (as tests/gpu/test_hilbert_gpu.py)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- the attention alone (no vLLM) -----------------------------------------------------------
GRIDS = [
    ([(1, 74, 74)], HilbertASettings()),                         # a 1024^2 image: 5476 patches
    ([(1, 40, 62)], HilbertASettings(min_tokens=1024)),          # non-square, 20 x 31 units
    ([(1, 46, 26)], HilbertASettings(tiles=5, min_tokens=512)),  # odd unit grid 23 x 13
    ([(1, 32, 32), (1, 20, 28), (2, 24, 24), (1, 16, 16)],        # several items, a 2-frame
     HilbertASettings(tiles=4, min_tokens=500)),                  # video, a dense frame
]


@pytest.mark.parametrize("grid,settings", GRIDS, ids=["1024sq", "non-square", "odd", "several"])
@pytest.mark.parametrize("ordinal", [0, 1, 2, 3])
def test_full_attention_equals_dense_under_the_mask_bf16(grid, settings, ordinal):
    plans = plan_segments(grid, MERGE, WINDOW_UNITS, settings)
    assert any(p.layout is not None for p in plans)
    n = sum(p.length for p in plans)
    gen = torch.Generator(device="cuda").manual_seed(1000 * ordinal + n)
    # Like vLLM's op inputs: [1, S, H, D] views of one qkv buffer (v strided).
    qkv = torch.randn(1, n, 3, HEADS, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out = encoder_attention(q, k, v, plans, ordinal, HEAD_DIM ** -0.5, kernel="triton")
    torch.cuda.synchronize()
    ref = masked_dense_reference(q, k, v, plans, ordinal, HEAD_DIM ** -0.5)
    assert rel(out, ref) < BF16_TOL


# -- vLLM 0.26's encoder ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_qwen():
    return pytest.importorskip("vllm.model_executor.models.qwen2_5_vl",
                               reason="vLLM with Qwen2.5-VL (0.26 staged, torchvision) not importable")


@pytest.mark.parametrize("h,w", [(74, 74), (146, 146), (40, 62), (46, 26), (8, 8), (2, 30)])
def test_window_order_is_vllms(vllm_qwen, h, w):
    fake = types.SimpleNamespace(window_size=112, spatial_merge_size=2, patch_size=14,
                                 spatial_merge_unit=4)
    index, _ = vllm_qwen.Qwen2_5_VisionTransformer.get_window_index_thw(fake, 1, h, w)
    assert index.tolist() == window_unit_order(h // 2, w // 2, WINDOW_UNITS).tolist()


@pytest.fixture(scope="module")
def encoder(vllm_qwen):
    from vllm_kvflow.patches.vision_encoder import build_qwen25_vision_encoder

    enc, vllm_config, hf = build_qwen25_vision_encoder(CONFIG, dtype=torch.bfloat16, seed=0)
    assert (enc.num_heads, enc.hidden_size, enc.fullatt_block_indexes) == (16, 1280, [7, 15, 23, 31])
    return types.SimpleNamespace(enc=enc, config=vllm_config)


def _image(size_hw, kind="shapes"):
    from vllm_kvflow.patches.vision_encoder import image_patches, make_image

    pixels, grid = image_patches(make_image(kind, *size_hw))
    return pixels.cuda(), grid.tolist()


@torch.no_grad()
def _run(encoder, pixels, grid):
    from vllm_kvflow.patches.vision_encoder import encoder_context

    with encoder_context(encoder.config):
        out = encoder.enc(pixels, grid)
    torch.cuda.synchronize()
    return out


@torch.no_grad()
@pytest.mark.parametrize("size_hw", [(1024, 1024), (700, 1300)])
def test_full_attention_block_output_equals_masked_dense(encoder, size_hw):
    """Block 7's output from its real input: Triton HilbertA against the dense masked
    reference in the same block, on the same weights."""
    from vllm_kvflow.patches.vision_encoder import encoder_context

    enc = encoder.enc
    pixels, grid = _image(size_hw)
    block, op = enc.blocks[7], enc.blocks[7].attn.attn
    captured = {}
    block_forward = block.forward

    def grab(*args, **kwargs):
        # vLLM's compile decorator calls a block's forward directly (no module hooks).
        captured["args"], captured["kwargs"] = args, kwargs
        return block_forward(*args, **kwargs)

    block.forward = grab
    try:
        stock_out = _run(encoder, pixels, grid)
    finally:
        del block.forward
    assert captured, "block 7 was not called"
    settings = HilbertASettings(min_tokens=1024)
    outs = {}
    for kernel in ("triton", "reference"):
        ctx = EncoderContext(MERGE, WINDOW_UNITS, settings, kernel=kernel)
        block.attn.attn = HilbertEncoderAttention(op, 0, ctx, op.scale)
        try:
            with encoder_context(encoder.config), ctx.frames(grid):
                outs[kernel] = block(*captured["args"], **captured["kwargs"])
        finally:
            block.attn.attn = op
    torch.cuda.synchronize()
    assert rel(outs["triton"], outs["reference"]) < BF16_TOL
    assert torch.isfinite(stock_out).all()


@torch.no_grad()
def test_whole_encoder_triton_equals_masked_dense_reference(encoder):
    from vllm_kvflow.patches import vision_attention as va

    pixels, grid = _image((1024, 1024))
    outs = {}
    for kernel in ("triton", "reference"):
        va.enable(encoder.enc, HilbertASettings(), kernel=kernel)
        try:
            outs[kernel] = _run(encoder, pixels, grid)
        finally:
            va.disable(encoder.enc)
    assert outs["triton"].shape == (37 * 37, 3584)
    assert rel(outs["triton"], outs["reference"]) < 2 * BF16_TOL


@torch.no_grad()
def test_one_tile_without_centre_reproduces_the_stock_encoder(encoder):
    from vllm_kvflow.patches import vision_attention as va

    pixels, grid = _image((448, 616))
    stock = _run(encoder, pixels, grid)
    va.enable(encoder.enc, HilbertASettings(tiles=1, central_fraction=0.0, min_tokens=1))
    try:
        dense = _run(encoder, pixels, grid)
    finally:
        va.disable(encoder.enc)
    assert rel(dense, stock) < 2 * BF16_TOL


@torch.no_grad()
def test_several_images_in_one_call(encoder):
    from vllm_kvflow.patches import vision_attention as va

    a, ga = _image((1024, 1024), "gradient")
    b, gb = _image((448, 700), "noise")
    pixels, grid = torch.cat([a, b]), ga + gb
    stock = _run(encoder, pixels, grid)
    va.enable(encoder.enc)
    try:
        sparse = _run(encoder, pixels, grid)
    finally:
        va.disable(encoder.enc)
    assert sparse.shape == stock.shape and torch.isfinite(sparse).all()
    # The small image (under min_tokens) kept dense attention: its tokens are the stock's
    # up to rounding; the large one's differ (HilbertA is sparse).
    n_a = ga[0][1] * ga[0][2] // 4
    assert rel(sparse[n_a:], stock[n_a:]) < 2 * BF16_TOL

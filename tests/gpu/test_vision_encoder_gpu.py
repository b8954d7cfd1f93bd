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
    the stock encoder (FlashAttention) output; with HilbertA on, each full-attention
    block runs HilbertEncoderAttention and never its stock op, the windowed ones only
    their stock op.
With vLLM installed but failing to import or build, the vLLM tests error (with its
traceback) rather than skip. A test's failure message carries what vLLM chose
(`describe`: attention backend, FlashAttention version, compile mode, IR providers).
Run: bash benchmarks/gpu/env.sh python3 -m pytest tests/gpu/test_vision_encoder_gpu.py -q
"""
from __future__ import annotations

import importlib
import importlib.util
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
    # Skip only where vLLM is absent: a staged vLLM that fails to import (torchvision,
    # transformers, a version mismatch) must show its traceback, not a skip.
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (stage 0.26 and run through benchmarks/gpu/env.sh)")
    return importlib.import_module("vllm.model_executor.models.qwen2_5_vl")


@pytest.mark.parametrize("h,w", [(74, 74), (146, 146), (40, 62), (46, 26), (8, 8), (2, 30)])
def test_window_order_is_vllms(vllm_qwen, h, w):
    fake = types.SimpleNamespace(window_size=112, spatial_merge_size=2, patch_size=14,
                                 spatial_merge_unit=4)
    index, _ = vllm_qwen.Qwen2_5_VisionTransformer.get_window_index_thw(fake, 1, h, w)
    assert index.tolist() == window_unit_order(h // 2, w // 2, WINDOW_UNITS).tolist()


@pytest.fixture(scope="module")
def encoder(vllm_qwen):
    from vllm_kvflow.patches.vision_encoder import build_qwen25_vision_encoder, describe

    enc, vllm_config, hf = build_qwen25_vision_encoder(CONFIG, dtype=torch.bfloat16, seed=0)
    choices = describe(enc, vllm_config)
    print(f"vLLM chose: {choices}")  # shown with the output of a failing test
    assert (enc.num_heads, enc.hidden_size, list(enc.fullatt_block_indexes)) == (16, 1280, [7, 15, 23, 31])
    yield types.SimpleNamespace(enc=enc, config=vllm_config, choices=choices)
    from vllm_kvflow.patches.vision_encoder import teardown_parallel_state

    teardown_parallel_state()


def test_encoder_is_built_as_an_engine_would(encoder):
    """bf16 weights on the GPU, blocks eager (HilbertA refuses compiled ones), no FP8
    attention, an attention backend vLLM's CUDA forward knows."""
    c = encoder.choices
    assert c["param_dtypes"] == ["torch.bfloat16"] and all(d.startswith("cuda") for d in c["param_devices"]), c
    assert c["blocks_compiled"] == [], c
    known = ("FLASH_ATTN", "TRITON_ATTN", "TORCH_SDPA", "FLASHINFER")
    assert all("fp8=False" in op and any(k in op for k in known) for op in c["full_attention_ops"]), c


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
        # A copy of the input: the block's fused add + RMSNorm may write into it in place
        # (vLLM IR's vllm_c provider does), and each run below gets a fresh copy too.
        captured["args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        captured["kwargs"] = kwargs
        return block_forward(*args, **kwargs)

    block.forward = grab
    try:
        stock_out = _run(encoder, pixels, grid)
    finally:
        del block.forward
    assert captured, "block 7 was not called"
    print(f"block 7 input {tuple(captured['args'][0].shape)}, kwargs "
          f"{ {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in captured['kwargs'].items()} }")
    settings = HilbertASettings(min_tokens=1024)
    outs = {}
    for kernel in ("triton", "reference"):
        ctx = EncoderContext(MERGE, WINDOW_UNITS, settings, kernel=kernel)
        block.attn.attn = HilbertEncoderAttention(op, 0, ctx, op.scale)
        try:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in captured["args"])
            with encoder_context(encoder.config), ctx.frames(grid):
                outs[kernel] = block(*args, **captured["kwargs"])
        finally:
            block.attn.attn = op
    torch.cuda.synchronize()
    assert rel(outs["triton"], outs["reference"]) < BF16_TOL
    assert torch.isfinite(stock_out).all()


@torch.no_grad()
def test_hilberta_runs_in_the_full_attention_blocks_only(encoder):
    """The swap took on vLLM's encoder: in one HilbertA forward, each full-attention block
    called HilbertEncoderAttention once and its stock op never (a forward without the
    frames would fall back to it silently); each windowed block its stock op once; after
    disable, the stock ops are back."""
    from vllm_kvflow.patches import vision_attention as va

    enc = encoder.enc
    stock_ops = [b.attn.attn for b in enc.blocks]
    pixels, grid = _image((1024, 1024))
    calls = {}

    def counter(key):
        def hook(module, args):
            calls[key] = calls.get(key, 0) + 1
        return hook

    va.enable(enc, HilbertASettings(), kernel="triton")
    try:
        handles = [op.register_forward_pre_hook(counter(("stock", i))) for i, op in enumerate(stock_ops)]
        handles += [b.attn.attn.register_forward_pre_hook(counter(("hilberta", i)))
                    for i, b in enumerate(enc.blocks) if isinstance(b.attn.attn, HilbertEncoderAttention)]
        try:
            _run(encoder, pixels, grid)
        finally:
            for h in handles:
                h.remove()
    finally:
        va.disable(enc)
    full = [7, 15, 23, 31]
    assert {i for kind, i in calls if kind == "hilberta"} == set(full), calls
    assert all(calls[("hilberta", i)] == 1 for i in full), calls
    assert {i for kind, i in calls if kind == "stock"} == set(range(len(enc.blocks))) - set(full), calls
    assert [b.attn.attn for b in enc.blocks] == stock_ops and "forward" not in vars(enc)


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
    n_a = ga[0][1] * ga[0][2] // 4
    assert not torch.equal(sparse[:n_a], stock[:n_a])  # HilbertA did run on the large one
    # The small image (under min_tokens) kept dense attention: its tokens are the stock's
    # up to rounding; the large one's differ (HilbertA is sparse).
    assert rel(sparse[n_a:], stock[n_a:]) < 2 * BF16_TOL

"""HilbertA in a Qwen2.5-VL-style vision encoder's full-attention blocks
(vision/encoder_attention.py): token order, layout, and equality to dense attention under
the same mask, for square, non-square and odd unit grids, several frames in one sequence,
head_dim 80; the Triton kernel path under TRITON_INTERPRET=1 in a child pytest (tests
named test_interp_*; interpreter_child.py says why).

The mask is also built here from the geometry alone (which patch is where in the image),
so the reference is not checked against itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpreter_child import require_interpreter_child, run_interpreter_child
from qwen_vision_standin import EncoderAttentionOp
from vllm_kvflow.vision.encoder_attention import (EncoderContext, HilbertASettings,
                                                  HilbertEncoderAttention, encoder_attention,
                                                  encoder_identity, masked_dense_reference,
                                                  plan_segments, window_unit_order)
from vllm_kvflow.vision.hilbert import central_block, hilbert_curve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread

MERGE, WINDOW_UNITS = 2, 4  # Qwen2.5-VL: 2x2 merge, 112-pixel windows of 14-pixel patches
SMALL = HilbertASettings(tiles=4, central_fraction=0.25, cycle=4, min_tokens=64)


def windows_by_loops(llm_h, llm_w, win):
    """The encoder's window order of units, written as nested loops."""
    out = []
    for wr in range(0, llm_h, win):
        for wc in range(0, llm_w, win):
            for r in range(wr, min(wr + win, llm_h)):
                for c in range(wc, min(wc + win, llm_w)):
                    out.append(r * llm_w + c)
    return np.array(out)


def patch_coords(llm_h, llm_w):
    """(row, col) in the patch grid of each token of a frame in the encoder's order:
    units in window order, each unit's 4 patches row-major."""
    units = windows_by_loops(llm_h, llm_w, WINDOW_UNITS)
    ur, uc = units // llm_w, units % llm_w
    p = np.arange(4)
    rows = (2 * ur[:, None] + p[None, :] // 2).reshape(-1)
    cols = (2 * uc[:, None] + p[None, :] % 2).reshape(-1)
    return rows, cols


def mask_from_geometry(llm_h, llm_w, tiles, central_fraction, ordinal, cycle):
    """[n, n] mask in the encoder's order built from where each patch is: its unit, whether
    that unit is central, and its rank along the Hilbert curve of the other units."""
    rows, cols = patch_coords(llm_h, llm_w)
    ur, uc = rows // 2, cols // 2
    r0, r1, c0, c1 = central_block(llm_h, llm_w, central_fraction)
    central = (ur >= r0) & (ur < r1) & (uc >= c0) & (uc < c1)
    curve = hilbert_curve(llm_h, llm_w)                       # (row, col) of units along it
    rank_of_unit = {}
    for r, c in curve:
        if not (r0 <= r < r1 and c0 <= c < c1):
            rank_of_unit[(int(r), int(c))] = len(rank_of_unit)
    n_local = len(rank_of_unit)
    tiles = min(tiles, n_local)
    g = -(-n_local // tiles)
    offset = (g * (ordinal % cycle)) // cycle
    rank = np.array([rank_of_unit.get((int(a), int(b)), -1) for a, b in zip(ur, uc)])
    q_rank, k_rank = rank[:, None], rank[None, :]
    start = ((q_rank // g) * g + offset) % n_local
    in_window = ((k_rank - start) % n_local) < g
    return central[:, None] | central[None, :] | (in_window & (q_rank >= 0) & (k_rank >= 0))


def dense_masked(q, k, v, mask, scale):
    s = torch.einsum("nhd,mhd->hnm", q.double(), k.double()) * scale
    s = s.masked_fill(~torch.as_tensor(mask), float("-inf"))
    return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), v.double())


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- order and plans -------------------------------------------------------------------------
@pytest.mark.parametrize("llm_h,llm_w", [(8, 8), (5, 7), (1, 9), (13, 4), (37, 37)])
def test_window_order_matches_the_loops(llm_h, llm_w):
    assert np.array_equal(window_unit_order(llm_h, llm_w, WINDOW_UNITS),
                          windows_by_loops(llm_h, llm_w, WINDOW_UNITS))


def test_plans_cover_frames_in_order_and_small_frames_stay_dense():
    grid = [(1, 16, 20), (2, 8, 8), (1, 6, 4)]   # 320 patches, a 2-frame item of 64, 24
    plans = plan_segments(grid, MERGE, WINDOW_UNITS, SMALL)
    assert [(p.start, p.length) for p in plans] == [(0, 320), (320, 64), (384, 64), (448, 24)]
    assert [p.layout is not None for p in plans] == [True, True, True, False]
    for p in plans[:3]:
        assert np.array_equal(np.sort(p.layout.order), np.arange(p.length))
        assert p.layout.n_shared % 4 == 0 and p.layout.tile_size == 4 * p.tile_units
    with pytest.raises(ValueError, match="multiples of the merge size"):
        plan_segments([(1, 7, 8)], MERGE, WINDOW_UNITS, SMALL)
    with pytest.raises(ValueError, match="not a permutation|permutation"):
        plan_segments([(1, 8, 8)], MERGE, WINDOW_UNITS, SMALL, unit_order=lambda t, h, w: np.zeros(16))


def test_tiles_are_clamped_to_the_local_units_and_settings_are_checked():
    plans = plan_segments([(1, 4, 4)], MERGE, WINDOW_UNITS,
                          HilbertASettings(tiles=99, min_tokens=1))   # 4 units, 1 central
    assert plans[0].tile_units == 1 and plans[0].layout.n_shared == 4
    for bad in (dict(tiles=0), dict(cycle=0), dict(min_tokens=-1), dict(central_fraction=1.0),
                dict(tiles=True)):
        with pytest.raises(ValueError, match="HilbertA"):
            HilbertASettings(**bad)
    assert encoder_identity("stock") == "stock"
    assert encoder_identity("hilberta") != encoder_identity("hilberta", SMALL)
    with pytest.raises(ValueError, match="unknown vision attention"):
        encoder_identity("flash")


@pytest.mark.parametrize("llm_h,llm_w", [(8, 8), (7, 11), (12, 5)])
def test_layout_composes_with_the_window_order(llm_h, llm_w):
    """Gathering a frame's tokens by the plan's order gives: the central units' patches
    first, then the other units along the Hilbert curve, each unit's four patches together
    and in place."""
    plan = plan_segments([(1, 2 * llm_h, 2 * llm_w)], MERGE, WINDOW_UNITS, SMALL)[0]
    rows, cols = patch_coords(llm_h, llm_w)
    ur, uc = rows[plan.layout.order] // 2, cols[plan.layout.order] // 2
    r0, r1, c0, c1 = central_block(llm_h, llm_w, 0.25)
    s = plan.layout.n_shared
    assert ((ur[:s] >= r0) & (ur[:s] < r1) & (uc[:s] >= c0) & (uc[:s] < c1)).all()
    assert s == 4 * (r1 - r0) * (c1 - c0)
    local_units = [(a, b) for a, b in hilbert_curve(llm_h, llm_w).tolist()
                   if not (r0 <= a < r1 and c0 <= b < c1)]
    got_units = list(zip(ur[s::4].tolist(), uc[s::4].tolist()))
    assert got_units == local_units
    # Within each unit, its 4 patches in row-major order.
    pr, pc = rows[plan.layout.order][s:].reshape(-1, 4) % 2, cols[plan.layout.order][s:].reshape(-1, 4) % 2
    assert (pr == [0, 0, 1, 1]).all() and (pc == [0, 1, 0, 1]).all()


# -- attention against the dense masked reference ----------------------------------------------
GRIDS = [
    [(1, 16, 16)],                       # square, 64 units
    [(1, 14, 22)],                       # non-square, odd unit grid 7 x 11
    [(1, 26, 10)],                       # tall, 13 x 5 units
    [(1, 12, 16), (1, 6, 6), (2, 10, 12)],  # several images, a dense one, a 2-frame item
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "+".join(f"{t}x{h}x{w}" for t, h, w in g))
@pytest.mark.parametrize("ordinal", [0, 1, 3])
@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_attention_equals_dense_under_the_mask(grid, ordinal, kernel):
    torch.manual_seed(hash((str(grid), ordinal)) % 2**31)
    plans = plan_segments(grid, MERGE, WINDOW_UNITS, SMALL)
    n = sum(p.length for p in plans)
    q, k, v = (torch.randn(1, n, 2, 80) for _ in range(3))
    scale = 80 ** -0.5
    out = encoder_attention(q, k, v, plans, ordinal, scale, kernel=kernel)
    ref = masked_dense_reference(q, k, v, plans, ordinal, scale)
    assert rel(out, ref) < 1e-5
    # The reference's mask is the geometric one, frame by frame.
    for p, (t, h, w) in zip(plans, [(t, h, w) for t, h, w in grid for _ in range(t)]):
        rows = slice(p.start, p.start + p.length)
        if p.layout is None:
            mask = np.ones((p.length, p.length), dtype=bool)
        else:
            mask = mask_from_geometry(h // 2, w // 2, SMALL.tiles, 0.25, ordinal, SMALL.cycle)
        exp = dense_masked(q[0, rows], k[0, rows], v[0, rows], mask, scale)
        assert rel(ref[0, rows], exp) < 1e-6


def test_one_tile_and_no_central_block_is_dense_attention():
    dense = HilbertASettings(tiles=1, central_fraction=0.0, min_tokens=1)
    grid = [(1, 14, 22), (1, 8, 8)]
    plans = plan_segments(grid, MERGE, WINDOW_UNITS, dense)
    assert all(p.layout is not None and p.layout.n_shared == 0 for p in plans)
    q, k, v = (torch.randn(1, 372, 3, 80, dtype=torch.float64) for _ in range(3))
    out = encoder_attention(q, k, v, plans, 2, 0.1, kernel="sdpa")
    for p in plans:
        rows = slice(p.start, p.start + p.length)
        exp = F.scaled_dot_product_attention(*(x[:, rows].transpose(1, 2) for x in (q, k, v)),
                                             scale=0.1).transpose(1, 2)
        assert rel(out[:, rows], exp) < 1e-12


def test_sparse_attention_differs_from_dense_where_the_mask_cuts():
    plans = plan_segments([(1, 16, 16)], MERGE, WINDOW_UNITS, SMALL)
    q, k, v = (torch.randn(1, 256, 2, 16) for _ in range(3))
    sparse = encoder_attention(q, k, v, plans, 0, 0.25, kernel="sdpa")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.25)
    assert rel(sparse, dense.transpose(1, 2)) > 0.05


def test_bad_inputs():
    plans = plan_segments([(1, 16, 16)], MERGE, WINDOW_UNITS, SMALL)
    q = torch.randn(1, 255, 2, 16)
    with pytest.raises(ValueError, match="do not match the sequence"):
        encoder_attention(q, q, q, plans, 0, 1.0)
    with pytest.raises(ValueError, match="batch 1"):
        encoder_attention(torch.randn(2, 256, 2, 16).expand(2, 256, 2, 16), *[torch.randn(2, 256, 2, 16)] * 2,
                          plans=plans, ordinal=0, scale=1.0)
    with pytest.raises(ValueError, match="one shape"):
        encoder_attention(torch.randn(1, 256, 2, 16), torch.randn(1, 256, 2, 8),
                          torch.randn(1, 256, 2, 16), plans, 0, 1.0)


# -- the drop-in module ----------------------------------------------------------------------
def test_module_runs_hilberta_with_frames_and_the_stock_op_without():
    stock = EncoderAttentionOp(0.2)  # vLLM 0.26's MMEncoderAttention contract
    ctx = EncoderContext(MERGE, WINDOW_UNITS, SMALL, kernel="sdpa")
    mod = HilbertEncoderAttention(stock, ordinal=1, context=ctx, scale=0.2)
    assert list(mod.children()) == [] and "stock" not in dict(mod.named_modules())
    grid = [(1, 16, 16), (1, 6, 6)]
    q, k, v = (torch.randn(1, 292, 2, 80) for _ in range(3))
    cu = torch.tensor([0, 256, 292], dtype=torch.int32)
    with ctx.frames(torch.tensor(grid)):
        out = mod(q, k, v, cu, torch.tensor(256), None)
    assert stock.calls == 0
    ref = masked_dense_reference(q, k, v, ctx.plans_for(grid), 1, 0.2)
    assert rel(out, ref) < 1e-5
    assert ctx.plans is None                      # cleared after the forward
    out = mod(q, k, v, cu, torch.tensor(256), None)  # no frames known: the stock op
    assert stock.calls == 1 and torch.equal(out, stock(q, k, v, cu))


# -- the Triton kernel under the interpreter ---------------------------------------------------
def test_kernel_path_under_triton_interpreter():
    """Run this file's ``test_interp_*`` tests in a TRITON_INTERPRET=1 child pytest."""
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_kernel_path_under_triton_interpreter")


@pytest.mark.parametrize("grid,ordinal", [([(1, 14, 22)], 1), ([(1, 12, 12), (1, 6, 4)], 3)])
def test_interp_triton_kernel_equals_dense_under_the_mask(interp, grid, ordinal):
    torch.manual_seed(7)
    plans = plan_segments(grid, MERGE, WINDOW_UNITS, SMALL)
    n = sum(p.length for p in plans)
    q, k, v = (torch.randn(1, n, 2, 80) for _ in range(3))
    out = encoder_attention(q, k, v, plans, ordinal, 80 ** -0.5, kernel="triton")
    ref = masked_dense_reference(q, k, v, plans, ordinal, 80 ** -0.5)
    assert rel(out, ref) < 1e-5

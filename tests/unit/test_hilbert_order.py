"""Properties of the generalized Hilbert order and the HilbertA [shared | local] layout.

Measured on every grid 1..40 x 1..40 (and a few large ones): the order is a bijection;
consecutive cells are 8-neighbours (Chebyshev distance 1) and almost always 4-neighbours
(mean Euclidean step 1.0002: a diagonal step appears only where parity forbids a pure
4-neighbour walk); every window of g consecutive cells, at any start, has a bounding box
of area at most 3 g + 2 sqrt(g) + 2 (measured worst 2.62 g, on 98x146 at g = 64), and
on average at most 1.6 g (measured 1.20-1.48 g for g in 16..960).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_kvflow.vision.hilbert import (central_block, hilbert_curve, hilbert_inverse,
                                        hilbert_layout, hilbert_permutation, sliding_offset)

GRIDS = [(h, w) for h in range(1, 41) for w in range(1, 41)]
LARGE = [(64, 64), (128, 128), (37, 53), (24, 90), (90, 24), (1, 500), (300, 2), (63, 127),
         (98, 146)]


def _steps(h, w):
    return np.abs(np.diff(hilbert_curve(h, w), axis=0))


@pytest.mark.parametrize("h,w", LARGE + [(1, 1), (2, 3), (3, 2), (5, 7)])
def test_bijection_and_inverse(h, w):
    perm = hilbert_permutation(h, w)
    inv = hilbert_inverse(h, w)
    assert perm.shape == (h * w,)
    assert np.array_equal(np.sort(perm), np.arange(h * w))
    assert np.array_equal(inv[perm], np.arange(h * w))
    assert np.array_equal(perm[inv], np.arange(h * w))
    rc = hilbert_curve(h, w)
    assert np.array_equal(rc[:, 0] * w + rc[:, 1], perm)


def test_bijection_all_small_grids():
    for h, w in GRIDS:
        assert np.array_equal(np.sort(hilbert_permutation(h, w)), np.arange(h * w)), (h, w)


def test_consecutive_cells_are_neighbours():
    dists, diagonal, total = [], 0, 0
    for h, w in GRIDS + LARGE:
        d = _steps(h, w)
        if d.size == 0:
            continue
        assert d.max() <= 1, f"{h}x{w}: a step jumps over a cell"
        assert (d.sum(1) >= 1).all(), f"{h}x{w}: a cell repeats"
        diagonal += int((d.sum(1) == 2).sum())
        total += len(d)
        dists.append(np.sqrt((d ** 2).sum(1)))
    mean = float(np.concatenate(dists).mean())
    print(f"\nmean step distance {mean:.5f} over {total} steps; {diagonal} diagonal steps")
    assert mean < 1.001
    assert diagonal / total < 1e-3


def test_square_power_of_two_has_no_diagonal():
    for n in (2, 4, 8, 16, 32, 64, 128):
        assert (_steps(n, n).sum(1) == 1).all()


@pytest.mark.parametrize("h,w", [(64, 64), (128, 128), (37, 53), (24, 90), (63, 127), (98, 146)])
@pytest.mark.parametrize("g", [16, 64, 240, 960])
def test_windows_are_compact(h, w, g):
    """Every window of g consecutive cells (any start) fits a bounding box of area
    <= 3 g + 2 sqrt(g) + 2; the mean over windows stays <= 1.6 g."""
    rc = hilbert_curve(h, w)
    if g > len(rc):
        pytest.skip("window longer than the grid")
    win = np.lib.stride_tricks.sliding_window_view(rc, (g, 2))[:, 0]   # [n - g + 1, g, 2]
    area = ((win[..., 0].max(1) - win[..., 0].min(1) + 1)
            * (win[..., 1].max(1) - win[..., 1].min(1) + 1))
    print(f"\n{h}x{w} g={g}: mean bbox/g {area.mean() / g:.2f}, max {area.max() / g:.2f}")
    assert area.max() <= 3 * g + 2 * math.sqrt(g) + 2
    assert area.mean() <= 1.6 * g


def test_cache_returns_same_read_only_object():
    assert hilbert_permutation(37, 53) is hilbert_permutation(37, 53)
    assert hilbert_inverse(37, 53) is hilbert_inverse(37, 53)
    assert hilbert_layout(32, 48, 10, 4) is hilbert_layout(32, 48, 10, 4)
    for arr in (hilbert_permutation(37, 53), hilbert_inverse(37, 53), hilbert_curve(37, 53),
                hilbert_layout(32, 48, 10, 4).order):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1


def test_central_block():
    assert central_block(64, 64) == (24, 40, 24, 40)           # the reference's 16x16
    assert central_block(128, 128) == (48, 80, 48, 80)
    assert central_block(7, 10) == (2, 4, 4, 6)
    assert central_block(3, 3, 0.0) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        central_block(4, 4, 1.5)


def test_layout_flux_1024():
    lay = hilbert_layout(64, 64, text_tokens=512, tiles=16)
    assert (lay.n_shared, lay.n_local, lay.tile_size) == (768, 3840, 240)
    assert np.array_equal(lay.order[:512], np.arange(512))          # text first, in order
    img = lay.order[512:] - 512
    rows, cols = img // 64, img % 64
    centre = (rows >= 24) & (rows < 40) & (cols >= 24) & (cols < 40)
    assert centre[:256].all() and not centre[256:].any()            # central block shared
    # local tokens keep Hilbert order
    inv = hilbert_inverse(64, 64)
    assert (np.diff(inv[img[256:]]) > 0).all()
    assert np.array_equal(lay.inverse[lay.order], np.arange(lay.n_tokens))


def test_layout_tensor_roundtrip():
    torch = pytest.importorskip("torch")
    lay = hilbert_layout(13, 29, text_tokens=5, tiles=7)
    x = torch.randn(2, lay.n_tokens, 3)
    y = lay.to_layout(x, dim=1)
    assert torch.equal(y[:, 0], x[:, lay.order[0]])
    assert torch.equal(lay.from_layout(y, dim=1), x)
    assert lay.tile_size == math.ceil(lay.n_local / 7)


def test_layout_validation():
    with pytest.raises(ValueError):
        hilbert_layout(4, 4, tiles=0)
    with pytest.raises(ValueError):
        hilbert_layout(4, 4, tiles=100)
    with pytest.raises(ValueError):
        hilbert_layout(0, 4)
    with pytest.raises(ValueError):
        hilbert_layout(4, 4, central_fraction=1.0)      # nothing local left
    with pytest.raises(ValueError):
        hilbert_layout(4, 4, text_tokens=-1)


def test_sliding_offset():
    assert [sliding_offset(240, layer) for layer in range(6)] == [0, 60, 120, 180, 0, 60]
    assert [sliding_offset(10, layer, cycle=4) for layer in range(4)] == [0, 2, 5, 7]
    assert hilbert_layout(64, 64, 512, 4).offset(3) == 720
    with pytest.raises(ValueError):
        sliding_offset(10, 0, cycle=0)


def _window_index(llm_h, llm_w, win=4):
    """Qwen2.5-VL's unit order for one frame: row-major inside win x win windows of
    units, windows row-major (vLLM's get_window_index_thw, written out)."""
    idx = []
    for wr in range(0, llm_h, win):
        for wc in range(0, llm_w, win):
            for r in range(wr, min(wr + win, llm_h)):
                for c in range(wc, min(wc + win, llm_w)):
                    idx.append(r * llm_w + c)
    return np.array(idx)


@pytest.mark.parametrize("llm_h,llm_w,tiles", [(8, 8, 4), (13, 9, 3), (5, 22, 1)])
def test_merged_segment_layout(llm_h, llm_w, tiles):
    from vllm_kvflow.vision.hilbert import merged_segment_layout

    wi = _window_index(llm_h, llm_w)
    seg = merged_segment_layout(llm_h, llm_w, wi, merge_unit=4, tiles=tiles)
    n = llm_h * llm_w * 4
    assert np.array_equal(np.sort(seg.order), np.arange(n))
    assert np.array_equal(seg.order[seg.inverse], np.arange(n))
    assert seg.n_shared % 4 == 0 and seg.tile_size % 4 == 0
    # each unit's 4 patches stay together, and the units follow the unit-grid layout
    units = seg.order.reshape(-1, 4)
    assert (np.diff(units, axis=1) == 1).all()
    lay = hilbert_layout(llm_h, llm_w, 0, tiles)
    assert np.array_equal(wi[units[:, 0] // 4], lay.order)
    with pytest.raises(ValueError):
        merged_segment_layout(llm_h, llm_w, wi[:-1])

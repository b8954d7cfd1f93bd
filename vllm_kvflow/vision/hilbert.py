"""Generalized Hilbert order for any H x W token grid and the HilbertA sequence layout.

HilbertA (arXiv 2509.26538; docs/ARCHITECTURE.md, Methods) makes 2-D neighbourhoods of
image tokens contiguous 1-D ranges by reordering the tokens along a space-filling curve.
The classic Hilbert curve only covers 2^k x 2^k grids; vision encoders see arbitrary
H x W patch grids, so this module builds a *generalized* Hilbert curve ("gilbert"-style)
for rectangles and odd sizes:

    a region is given by an origin and two edge vectors, a = the major (longer) edge and
    b = the minor edge. A region one cell thick is walked straight. A region much longer
    than wide (2|a| > 3|b|) is cut across the major edge into two halves walked one after
    the other. Otherwise it is cut into three parts like the Hilbert "U": the first part
    runs along b with the roles of a and b swapped, the middle runs along a, the last runs
    back along -b. Halves are made even where possible so that each part ends next to
    where the following one starts; a single diagonal step remains only where parity makes
    a pure 4-neighbour walk impossible (e.g. an even major edge with an odd minor edge).

Sequence layout: the input sequence is [text tokens | image tokens in row-major order].
HilbertA reorders it to [shared | local]:
    shared = text tokens, then the image's central block (default the central
             1/4 x 1/4 block) in Hilbert order — every query attends to them, and shared
             queries attend to everything;
    local  = the remaining image tokens in Hilbert order, split into tiles of g tokens;
             a query in tile t attends to shared keys plus the wrapped window
             local[(t*g + offset_l) mod N_local : + g].
Sliding schedule across layers: offset_l = floor(g * (l mod C) / C), which equals
(g / C) * (l mod C) whenever C divides g (C = 4 by default).

Pure python/numpy (torch only for the optional tensor helpers); no vLLM or triton needed.
Arrays returned from the caches are read-only; do not modify returned tensors either.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "hilbert_curve",
    "hilbert_permutation",
    "hilbert_inverse",
    "central_block",
    "HilbertLayout",
    "hilbert_layout",
    "sliding_offset",
    "SegmentLayout",
    "merged_segment_layout",
]


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _half(v: int) -> int:
    """Half of a signed edge length, rounded toward zero."""
    return int(v / 2)


def _walk(x: int, y: int, ax: int, ay: int, bx: int, by: int, out: list) -> None:
    """Append the cells of region (origin (x, y), major edge (ax, ay), minor edge (bx, by))
    to `out` as (x, y) pairs, in generalized Hilbert order. Exactly one of ax, ay is
    non-zero, and likewise for bx, by; the curve starts at the origin and ends at the far
    end of the major edge."""
    w = abs(ax + ay)  # cells along the major edge
    h = abs(bx + by)  # cells along the minor edge
    dax, day = _sign(ax), _sign(ay)  # unit step along the major edge
    dbx, dby = _sign(bx), _sign(by)  # unit step along the minor edge

    if h == 1:  # one row thick: walk straight along a
        for i in range(w):
            out.append((x + i * dax, y + i * day))
        return
    if w == 1:  # one column thick: walk straight along b
        for i in range(h):
            out.append((x + i * dbx, y + i * dby))
        return

    ax2, ay2 = _half(ax), _half(ay)
    bx2, by2 = _half(bx), _half(by)
    w2 = abs(ax2 + ay2)
    h2 = abs(bx2 + by2)

    if 2 * w > 3 * h:
        # Long region: two halves along a. An odd first half would end on the wrong side
        # of the minor edge, so make it even (when the region is wide enough to allow it).
        if w2 % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        _walk(x, y, ax2, ay2, bx, by, out)
        _walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out)
        return

    # Hilbert "U": up along b (edges swapped), across along a, back down along -b.
    if h2 % 2 and h > 2:
        bx2, by2 = bx2 + dbx, by2 + dby
    _walk(x, y, bx2, by2, ax2, ay2, out)
    _walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out)
    _walk(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
          -bx2, -by2, -(ax - ax2), -(ay - ay2), out)


def _check_grid(height: int, width: int) -> None:
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))):
        raise TypeError(f"grid size must be integers, got {height!r} x {width!r}")
    if height < 1 or width < 1:
        raise ValueError(f"grid size must be positive, got {height} x {width}")


@functools.lru_cache(maxsize=64)
def hilbert_curve(height: int, width: int) -> np.ndarray:
    """(H*W, 2) int64 array of (row, col) cells in generalized Hilbert order. Read-only."""
    _check_grid(height, width)
    cells: list = []
    # x runs along the width (columns), y along the height (rows); the major edge is
    # the longer side so the recursion starts from a region at most 3:2 after one split.
    if width >= height:
        _walk(0, 0, width, 0, 0, height, cells)
    else:
        _walk(0, 0, 0, height, width, 0, cells)
    xy = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    rc = np.ascontiguousarray(xy[:, ::-1])  # (row, col)
    rc.setflags(write=False)
    return rc


@functools.lru_cache(maxsize=64)
def hilbert_permutation(height: int, width: int) -> np.ndarray:
    """perm[k] = row-major index (r*W + c) of the k-th cell along the curve. Read-only."""
    rc = hilbert_curve(height, width)
    perm = rc[:, 0] * width + rc[:, 1]
    perm.setflags(write=False)
    return perm


@functools.lru_cache(maxsize=64)
def hilbert_inverse(height: int, width: int) -> np.ndarray:
    """inv[r*W + c] = position of that cell along the curve. Read-only."""
    perm = hilbert_permutation(height, width)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    inv.setflags(write=False)
    return inv


def central_block(height: int, width: int, fraction: float = 0.25) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the centred block of about fraction*H x fraction*W cells.

    fraction 0 gives an empty block; otherwise each side is at least one cell.
    A 64x64 grid with fraction 1/4 gives rows and cols 24..40 (16 x 16)."""
    _check_grid(height, width)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"central fraction must lie in [0, 1], got {fraction}")
    if fraction == 0.0:
        return (0, 0, 0, 0)
    bh = max(1, round(height * fraction))
    bw = max(1, round(width * fraction))
    r0 = (height - bh) // 2
    c0 = (width - bw) // 2
    return (r0, r0 + bh, c0, c0 + bw)


def sliding_offset(tile_size: int, layer: int, cycle: int = 4) -> int:
    """Window offset of `layer` in the sliding schedule: floor(g * (layer mod C) / C)."""
    if cycle < 1:
        raise ValueError(f"cycle must be >= 1, got {cycle}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    return (tile_size * (layer % cycle)) // cycle


@dataclass(frozen=True)
class HilbertLayout:
    """The [shared | local] order of one [text | image] sequence.

    order[j]   = index in the original sequence of the token placed at layout position j
    inverse[i] = layout position of original token i
    n_shared   = text tokens + central-block tokens (the first n_shared layout positions)
    n_local    = remaining image tokens; tile_size = g = ceil(n_local / tiles), so the
                 last tile may be shorter than g when tiles does not divide n_local.
    """

    height: int
    width: int
    text_tokens: int
    tiles: int
    central_fraction: float
    order: np.ndarray
    inverse: np.ndarray
    n_shared: int
    n_local: int
    tile_size: int

    @property
    def n_tokens(self) -> int:
        return self.n_shared + self.n_local

    def offset(self, layer: int, cycle: int = 4) -> int:
        """Sliding-schedule window offset for `layer` (see sliding_offset)."""
        return sliding_offset(self.tile_size, layer, cycle)

    def order_tensor(self, device=None):
        """`order` as a torch int64 tensor (cached per device; do not modify)."""
        return _as_tensor(self, "order", str(device) if device is not None else "cpu")

    def inverse_tensor(self, device=None):
        return _as_tensor(self, "inverse", str(device) if device is not None else "cpu")

    def to_layout(self, x, dim: int = -2):
        """Reorder a torch tensor whose `dim` runs over the original sequence."""
        return x.index_select(dim, self.order_tensor(x.device))

    def from_layout(self, x, dim: int = -2):
        """Undo to_layout."""
        return x.index_select(dim, self.inverse_tensor(x.device))

    def __hash__(self) -> int:  # arrays are derived from the scalar fields
        return hash((self.height, self.width, self.text_tokens, self.tiles,
                     self.central_fraction))

    def __eq__(self, other) -> bool:
        return isinstance(other, HilbertLayout) and hash(self) == hash(other) and (
            (self.height, self.width, self.text_tokens, self.tiles, self.central_fraction)
            == (other.height, other.width, other.text_tokens, other.tiles,
                other.central_fraction))


@functools.lru_cache(maxsize=128)
def hilbert_layout(height: int, width: int, text_tokens: int = 0, tiles: int = 16,
                   central_fraction: float = 0.25) -> HilbertLayout:
    """The cached [shared | local] layout for a [text | H x W image] sequence."""
    _check_grid(height, width)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    r0, r1, c0, c1 = central_block(height, width, central_fraction)
    perm = hilbert_permutation(height, width)
    rows, cols = perm // width, perm % width
    in_centre = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    centre = perm[in_centre]        # central block, Hilbert order
    local = perm[~in_centre]        # the rest, Hilbert order
    n_local = int(local.size)
    if n_local == 0:
        raise ValueError(f"the central block covers the whole {height}x{width} grid; "
                         "lower central_fraction")
    if not 1 <= tiles <= n_local:
        raise ValueError(f"tiles must lie in [1, {n_local}] (local image tokens), got {tiles}")
    order = np.concatenate([np.arange(text_tokens, dtype=np.int64),
                            text_tokens + centre, text_tokens + local])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=np.int64)
    order.setflags(write=False)
    inverse.setflags(write=False)
    return HilbertLayout(height=height, width=width, text_tokens=text_tokens, tiles=tiles,
                         central_fraction=central_fraction, order=order, inverse=inverse,
                         n_shared=text_tokens + int(centre.size), n_local=n_local,
                         tile_size=math.ceil(n_local / tiles))


@dataclass(frozen=True)
class SegmentLayout:
    """[shared | local] order of one attention segment whose tokens come in merge units.

    order[j] = position in the segment of the token placed at layout position j;
    n_shared and tile_size are in tokens (whole merge units)."""

    order: np.ndarray
    inverse: np.ndarray
    n_shared: int
    tile_size: int


def merged_segment_layout(grid_h: int, grid_w: int, unit_order, merge_unit: int = 4,
                          tiles: int = 16, central_fraction: float = 0.25) -> SegmentLayout:
    """Layout for a vision-encoder segment that holds a grid_h x grid_w grid of merge units
    (e.g. Qwen2.5-VL: 2x2 patches per unit, kept contiguous) in an arbitrary unit order.

    unit_order[p] = row-major index (r * grid_w + c) of the p-th unit of the segment
    (Qwen2.5-VL: the frame's slice of `window_index`). The Hilbert curve runs over units,
    so a unit's patches stay together and tiles end on unit boundaries."""
    lay = hilbert_layout(grid_h, grid_w, 0, tiles, central_fraction)
    unit_order = np.asarray(unit_order, dtype=np.int64).reshape(-1)
    n_units = grid_h * grid_w
    if unit_order.size != n_units or not np.array_equal(np.sort(unit_order), np.arange(n_units)):
        raise ValueError(f"unit_order must be a permutation of the {grid_h}x{grid_w} units")
    if merge_unit < 1:
        raise ValueError(f"merge_unit must be >= 1, got {merge_unit}")
    pos_of_unit = np.empty_like(unit_order)
    pos_of_unit[unit_order] = np.arange(n_units, dtype=np.int64)
    units = pos_of_unit[lay.order]                          # segment slot of each unit
    order = (units[:, None] * merge_unit + np.arange(merge_unit)).reshape(-1)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=np.int64)
    order.setflags(write=False)
    inverse.setflags(write=False)
    return SegmentLayout(order=order, inverse=inverse, n_shared=lay.n_shared * merge_unit,
                         tile_size=lay.tile_size * merge_unit)


@functools.lru_cache(maxsize=64)
def _as_tensor(layout: HilbertLayout, which: str, device: str):
    import torch

    return torch.from_numpy(np.array(getattr(layout, which))).to(device)

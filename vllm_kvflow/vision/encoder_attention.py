"""HilbertA attention for the full-attention blocks of a Qwen2.5-VL-style vision encoder.

What the encoder's tokens are (vLLM 0.26, Qwen2_5_VisionTransformer; line references in
benchmarks/VLM_NOTES.md): one token per 14 x 14 patch, so an image is a grid_h x grid_w
grid of patches (both even). The processor emits them in merge units: each 2 x 2 block of
patches (spatial_merge_size 2), the unit's four patches contiguous and row-major inside
it. Before the blocks the encoder reorders the units into window order: windows of
window_size / merge / patch = 4 x 4 units, windows row-major, units row-major inside a
window, the right and bottom windows cut short (`window_index`); after the blocks it
merges each unit's four patches into one LLM token and undoes the reordering. The windowed
blocks attend inside each window; the full-attention blocks (fullatt_block_indexes, e.g.
7, 15, 23, 31) attend over each frame's whole grid (`cu_seqlens`: one sequence per image
frame).

HilbertA in a full-attention block, per frame:
  * the Hilbert curve runs over the frame's unit grid (grid_h/2 x grid_w/2), so a unit's
    four patches stay together and every tile ends on a unit boundary;
  * layout [shared | local]: shared = the central block of units (central_fraction of each
    side), local = the other units in Hilbert order, cut into `tiles` tiles of g units;
  * a shared query attends to every key; every query attends to the shared keys; a local
    query in tile t also attends to the window of g units starting at tile t shifted by the
    layer's offset (wrapping);
  * sliding schedule: the k-th full-attention block uses offset floor(g (k mod C) / C)
    units (C = cycle), so information crosses tiles over the blocks;
  * composition with the window order: the layout is built from the frame's units in the
    encoder's own sequence order (vision/hilbert.py merged_segment_layout), so a gather by
    `order` takes the block's tokens straight from window order to layout order and a
    scatter puts the output back.
Frames with fewer than `min_tokens` patches keep dense attention (exact; the sparse layout
saves nothing there). The output equals dense attention under the HilbertA mask
(masked_dense_reference), and with one tile and no central block it is dense attention.

Kernels (one registry): "triton" (csrc_triton/hilbert_attention.py; CUDA, or
TRITON_INTERPRET=1), "sdpa" (torch SDPA per tile, exact, any device: the CPU path) and
"reference" (dense float32 under the mask, O(n^2): tests). No vLLM import here;
patches/vision_attention.py puts HilbertEncoderAttention into vLLM 0.26's encoder.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vllm_kvflow.vision.hilbert import SegmentLayout, hilbert_layout, merged_segment_layout, sliding_offset

logger = logging.getLogger("vllm_kvflow")

__all__ = ["HilbertASettings", "SegmentPlan", "EncoderContext", "HilbertEncoderAttention",
           "KERNELS", "encoder_attention", "encoder_identity", "masked_dense_reference",
           "plan_segments", "window_unit_order"]


@dataclass(frozen=True)
class HilbertASettings:
    """HilbertA's layout parameters in the encoder."""

    tiles: int = 16  # tiles per frame (fewer if the frame has fewer local units)
    central_fraction: float = 0.25  # shared central block, per side
    cycle: int = 4  # sliding schedule period, in full-attention blocks
    min_tokens: int = 4096  # frames with fewer patches keep dense attention

    def __post_init__(self):
        for name in ("tiles", "cycle", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HilbertA {name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.central_fraction < 1.0:
            raise ValueError(f"HilbertA central_fraction must lie in [0, 1), got {self.central_fraction!r}")

    def identity(self) -> str:
        return (f"hilberta(tiles={self.tiles},central={self.central_fraction!r},"
                f"cycle={self.cycle},min_tokens={self.min_tokens})")


def encoder_identity(mode: str, settings: HilbertASettings | None = None) -> str:
    """What the encoder's attention contributes to an image chunk's key (vision/image_key)."""
    if mode == "stock":
        return "stock"
    if mode == "hilberta":
        return (settings or HilbertASettings()).identity()
    raise ValueError(f"unknown vision attention {mode!r}")


# ----------------------------------------------------------------------------- token order

def window_unit_order(llm_h: int, llm_w: int, window_units: int) -> np.ndarray:
    """Units of one frame (row-major index r * llm_w + c) in the encoder's window order:
    windows of window_units x window_units units row-major, units row-major inside each,
    edge windows cut short."""
    if min(llm_h, llm_w, window_units) < 1:
        raise ValueError(f"grid {llm_h}x{llm_w} and window {window_units} must be positive")
    rows = np.arange(llm_h)[:, None]
    cols = np.arange(llm_w)[None, :]
    win_r, win_c = rows // window_units, cols // window_units
    windows_per_row = -(-llm_w // window_units)
    # Sort key: window (row-major), then the unit's row-major place inside its window.
    key = ((win_r * windows_per_row + win_c) * (window_units * window_units)
           + (rows % window_units) * window_units + (cols % window_units))
    return np.argsort(key.reshape(-1), kind="stable")


@dataclass(frozen=True)
class SegmentPlan:
    """One frame's tokens in a full-attention block: rows [start, start + length) of the
    block's sequence, and its HilbertA layout (None: dense attention)."""

    start: int
    length: int
    layout: SegmentLayout | None = None
    tile_units: int = 0  # g, in units (the offsets are whole units)
    merge_unit: int = 4

    def offset(self, ordinal: int, cycle: int) -> int:
        """Window offset in tokens for the ordinal-th full-attention block."""
        return sliding_offset(self.tile_units, ordinal, cycle) * self.merge_unit


@functools.lru_cache(maxsize=256)
def _frame_layout(llm_h: int, llm_w: int, unit_order: bytes, merge_unit: int,
                  settings: HilbertASettings) -> tuple[SegmentLayout, int]:
    order = np.frombuffer(unit_order, dtype=np.int64)
    n_local = hilbert_layout(llm_h, llm_w, 0, 1, settings.central_fraction).n_local
    tiles = min(settings.tiles, n_local)
    layout = merged_segment_layout(llm_h, llm_w, order, merge_unit, tiles, settings.central_fraction)
    return layout, layout.tile_size // merge_unit


def plan_segments(grid_thw: Sequence[Sequence[int]], merge: int, window_units: int,
                  settings: HilbertASettings,
                  unit_order: Callable[[int, int, int], np.ndarray] | None = None) -> list[SegmentPlan]:
    """Plans of every frame of the items in grid_thw ((t, h, w) in patches, as the encoder
    receives them), in sequence order. unit_order(t, h, w): the item's units (frame-major,
    row-major index within the item) in the encoder's order; default: window order
    (window_unit_order) per frame. Raises ValueError where it is not a permutation."""
    plans, start = [], 0
    unit = merge * merge
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)}: h and w must be positive multiples "
                             f"of the merge size {merge}")
        llm_h, llm_w = h // merge, w // merge
        units = llm_h * llm_w
        if unit_order is None:
            frame = window_unit_order(llm_h, llm_w, window_units)
            item = np.concatenate([frame + f * units for f in range(t)])
        else:
            item = np.asarray(unit_order(t, h, w), dtype=np.int64).reshape(-1)
        if item.size != t * units:
            raise ValueError(f"unit order for {(t, h, w)} has {item.size} units, expected {t * units}")
        for f in range(t):
            frame_order = item[f * units:(f + 1) * units] - f * units
            length = h * w
            layout, g = None, 0
            if length >= settings.min_tokens and units >= 2:
                layout, g = _frame_layout(llm_h, llm_w, np.ascontiguousarray(frame_order).tobytes(),
                                          unit, settings)
            plans.append(SegmentPlan(start, length, layout, g, unit))
            start += length
    return plans


# ----------------------------------------------------------------------------- kernels

def _kernel_triton(q, k, v, n_shared, tile, offset, scale):
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention

    return hilbert_attention(q, k, v, n_shared, tile, offset, scale)


def _kernel_sdpa(q, k, v, n_shared, tile, offset, scale):
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention_sdpa

    return hilbert_attention_sdpa(q, k, v, n_shared, tile, offset, scale)


def _kernel_reference(q, k, v, n_shared, tile, offset, scale):
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention_reference

    return hilbert_attention_reference(q, k, v, n_shared, tile, offset, scale).to(q.dtype)


# name -> fn(q, k, v [1, H, n, D] in layout order, n_shared, tile_size, offset, scale)
KERNELS: dict[str, Callable] = {"triton": _kernel_triton, "sdpa": _kernel_sdpa,
                                "reference": _kernel_reference}


def default_kernel(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "sdpa"


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"query, key, value must be [1, S, H, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"the encoder's attention runs with batch 1 (frames are sequences "
                         f"of cu_seqlens), got batch {q.shape[0]}")


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      plans: Sequence[SegmentPlan], ordinal: int, scale: float,
                      cycle: int = 4, kernel: str | None = None,
                      index_cache: dict | None = None) -> torch.Tensor:
    """Attention of one full-attention block: q, k, v [1, S, H, D] in the encoder's order,
    each frame attending within itself (HilbertA where planned, dense elsewhere).
    Returns [1, S, H, D] in q's dtype. index_cache: a dict the caller keeps, for the
    device copies of the layouts' indices."""
    _check_qkv(q, k, v)
    total = sum(p.length for p in plans)
    if total != q.shape[1]:
        raise ValueError(f"the frames' tokens ({total}) do not match the sequence ({q.shape[1]})")
    run = KERNELS[kernel or default_kernel(q.device)]
    out = torch.empty_like(q)
    for plan in plans:
        rows = slice(plan.start, plan.start + plan.length)
        if plan.layout is None:
            qs, ks, vs = (x[:, rows].transpose(1, 2) for x in (q, k, v))
            out[:, rows] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2)
            continue
        idx = _device_index(plan, q.device, index_cache)
        qs, ks, vs = (x.index_select(1, idx).transpose(1, 2) for x in (q, k, v))  # [1, H, n, D]
        o = run(qs, ks, vs, plan.layout.n_shared, plan.layout.tile_size,
                plan.offset(ordinal, cycle), scale)
        out.index_copy_(1, idx, o.transpose(1, 2).to(q.dtype))
    return out


def _device_index(plan: SegmentPlan, device, cache: dict | None) -> torch.Tensor:
    key = (plan.start, id(plan.layout), str(device))
    if cache is not None and key in cache:
        return cache[key][1]
    idx = torch.from_numpy(np.asarray(plan.layout.order) + plan.start).to(device)
    if cache is not None:
        if len(cache) >= 1024:  # many batch compositions: start over
            cache.clear()
        cache[key] = (plan.layout, idx)  # holds the layout so its id is not reused
    return idx


def masked_dense_reference(q, k, v, plans: Sequence[SegmentPlan], ordinal: int, scale: float,
                           cycle: int = 4) -> torch.Tensor:
    """Dense float32 attention of each frame under the HilbertA mask mapped back to the
    encoder's order (full mask for dense frames): what encoder_attention must equal.
    O(n^2) memory per frame."""
    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention_mask

    _check_qkv(q, k, v)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for plan in plans:
        rows = slice(plan.start, plan.start + plan.length)
        qs, ks, vs = (x[0, rows].transpose(0, 1).float() for x in (q, k, v))  # [H, n, D]
        s = (qs @ ks.transpose(-1, -2)) * scale
        if plan.layout is not None:
            lay = plan.layout
            mask = hilbert_attention_mask(plan.length, lay.n_shared, lay.tile_size,
                                          plan.offset(ordinal, cycle), device=q.device)
            inv = torch.from_numpy(np.array(lay.inverse)).to(q.device)
            s = s.masked_fill(~mask[inv][:, inv], float("-inf"))
        out[0, rows] = (torch.softmax(s, -1) @ vs).transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- module

class EncoderContext:
    """The frames of the encoder forward in progress, shared by its full-attention blocks:
    the encoder's forward is wrapped to set them (frames), since a block's attention only
    sees cu_seqlens, which do not say each frame's grid."""

    def __init__(self, merge: int, window_units: int, settings: HilbertASettings,
                 unit_order: Callable[[int, int, int], np.ndarray] | None = None,
                 kernel: str | None = None):
        self.merge, self.window_units, self.settings = merge, window_units, settings
        self.unit_order, self.kernel = unit_order, kernel
        self.plans: list[SegmentPlan] | None = None
        self.index_cache: dict = {}
        self._plan_cache: dict = {}

    def plans_for(self, grid_thw) -> list[SegmentPlan]:
        key = tuple(tuple(int(x) for x in g) for g in grid_thw)
        plans = self._plan_cache.get(key)
        if plans is None:
            if len(self._plan_cache) >= 256:  # many distinct image sizes: start over
                self._plan_cache.clear()
                self.index_cache.clear()
            plans = plan_segments(key, self.merge, self.window_units, self.settings, self.unit_order)
            self._plan_cache[key] = plans
        return plans

    @contextlib.contextmanager
    def frames(self, grid_thw):
        """Within: the blocks' attention knows the frames of grid_thw (None: unknown, the
        stock attention runs)."""
        self.plans = None if grid_thw is None else self.plans_for(_as_list(grid_thw))
        try:
            yield
        finally:
            self.plans = None


def _as_list(grid_thw):
    return grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)


class HilbertEncoderAttention(torch.nn.Module):
    """Drop-in for the attention op (vLLM's MMEncoderAttention) of one full-attention
    block: the same forward(query, key, value, cu_seqlens, max_seqlen, sequence_lengths),
    query/key/value [1, S, H, D], output [1, S, H, D]. HilbertA over the frames its
    context holds; without them (the encoder ran without grid_thw) the stock op."""

    def __init__(self, stock: torch.nn.Module, ordinal: int, context: EncoderContext, scale: float):
        super().__init__()
        # Not a submodule: its (weight-free) state stays under its own name in the model.
        self.__dict__["stock"] = stock
        self.ordinal, self.context, self.scale = ordinal, context, float(scale)
        self._warned = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: torch.Tensor | None = None,
                sequence_lengths: torch.Tensor | None = None) -> torch.Tensor:
        plans = self.context.plans
        if plans is None:
            if not self._warned:
                logger.warning("kvflow: HilbertA needs the encoder's grid_thw; this forward "
                               "had none, so the stock attention ran")
                self._warned = True
            return self.stock(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
        return encoder_attention(query, key, value, plans, self.ordinal, self.scale,
                                 self.context.settings.cycle, self.context.kernel,
                                 self.context.index_cache)

    def extra_repr(self) -> str:
        return f"ordinal={self.ordinal}, {self.context.settings.identity()}"

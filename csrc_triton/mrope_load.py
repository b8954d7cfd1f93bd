"""M-RoPE chunk load: copy a cached chunk's K/V into the paged cache, re-rotating K from
the multimodal positions it was computed at to new ones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

M-RoPE gives every token three position ids (t, h, w). The r/2 rotary frequencies f_i are
shared out among the three axes by ``mrope_section = [s_t, s_h, s_w]`` (s_t + s_h + s_w =
r/2), and pair i of the key dims is turned by the angle p_sec(i) * f_i, where sec(i) is

    chunked     (Qwen2-VL, Qwen2.5-VL): the first s_t frequencies follow t, the next s_h
                follow h, the last s_w follow w;
    interleaved (Qwen3-VL, ``mrope_interleaved``): i % 3 == 1 and i < 3 s_h follow h,
                i % 3 == 2 and i < 3 s_w follow w, every other i follows t.

Each pair is still a plane rotation, and rotations compose, so moving a token by
(d_t, d_h, d_w) = new - old ids turns pair i by the extra angle d_sec(i) * f_i:

    K_new[pair i] = R(d_sec(i) f_i) K_old[pair i]                                  (1)

exactly, as in the 1-D case (csrc_triton/chunk_load.py, whose docstring has the cos/sin
cache layout, the sign of negative deltas and the unit normalisation that makes YaRN's
magnitude factor cancel; all of it holds here per frequency). vLLM's M-RoPE keeps the same
``cos_sin_cache[p] = [cos(p f_i) ... | sin(p f_i) ...]`` as plain RoPE and only chooses,
per frequency, which of the three ids indexes it.

When a chunk moves inside a prompt (an image or a text run placed after other content than
the one it was computed behind) its three ids all shift by the same delta d (vLLM 0.26
gives an image's tokens (t, h, w) grid indices plus the text position it starts at; see
benchmarks/VLM_NOTES.md). Then (1) turns every frequency by d f_i whatever its section:
the same as the 1-D re-rotation by d, so ``chunk_load``'s fused kernel serves moved
M-RoPE chunks unchanged once d comes from M-RoPE positions, not token indices. This module
is the general form, three deltas per token (a test pins that equal deltas reproduce the
1-D rotation); it reads and writes the same cache views as ``chunk_load``.

Pairing of key dims (neox / GPT-J), the dims past rotary_dim and V are as in chunk_load.
``rotate_keys_mrope_reference`` and ``load_chunk_kv_mrope_reference`` are the torch
equivalents (the CPU path); they import no Triton.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vllm_kvflow.kernels.chunk_load import _check_inputs, _interpreting, layer_offsets

try:  # Triton is optional: the CPU path uses the torch reference only.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "frequency_axes",
    "load_chunk_kv_mrope",
    "load_chunk_kv_mrope_layers",
    "load_chunk_kv_mrope_reference",
    "rotate_keys_mrope_reference",
]


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _turn(x1, x2, cos, sin):
        """(x1, x2) turned by the angle whose (cos, sin) are given, in float32."""
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    # T changes with every load: not specialized on it (no recompile while serving).
    @triton.jit(do_not_specialize=["T", "s_kl", "s_vl"])
    def _load_chunk_kv_mrope_kernel(
        k_src, v_src, k_cache, v_cache, slot_ptr, delta_ptr, cos_sin_ptr,
        k_layer_off, v_layer_off,  # per-layer element offsets (units of 16) from the caches
        T, block_size,
        s_kl, s_vl,  # k_src / v_src layer strides
        s_kt, s_kh, s_kd,  # k_src strides (token, head, dim)
        s_vt, s_vh, s_vd,  # v_src strides
        c_kb, c_ks, c_kh, c_kd,  # key_cache strides (block, slot-in-block, head, dim)
        c_vb, c_vs, c_vh, c_vd,  # value_cache strides
        s_dt, s_da,  # deltas strides (token, axis)
        s_cp, s_cd,  # cos_sin_cache strides (position, column)
        HEAD_DIM: tl.constexpr,
        ROT_DIM: tl.constexpr,
        IS_NEOX: tl.constexpr,
        SEC_T: tl.constexpr,
        SEC_H: tl.constexpr,
        SEC_W: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_HALF: tl.constexpr,  # >= ROT_DIM // 2, power of two
        BLOCK_TAIL: tl.constexpr,  # >= HEAD_DIM - ROT_DIM, power of two
        BLOCK_D: tl.constexpr,  # >= HEAD_DIM, power of two
    ):
        HALF: tl.constexpr = ROT_DIM // 2
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        layer = tl.program_id(2)  # one launch for all layers, as in chunk_load
        k_cache += tl.load(k_layer_off + layer) * 16
        v_cache += tl.load(v_layer_off + layer) * 16

        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
        ok = t_ok & (slot >= 0)  # slot -1: padding, nothing read or written
        blk = slot // block_size
        off = slot % block_size
        t64 = t.to(tl.int64)

        src_k = k_src + layer * s_kl + t64[:, None] * s_kt + h * s_kh
        src_v = v_src + layer * s_vl + t64[:, None] * s_vt + h * s_vh
        dst_k = k_cache + blk[:, None] * c_kb + off[:, None] * c_ks + h * c_kh
        dst_v = v_cache + blk[:, None] * c_vb + off[:, None] * c_vs + h * c_vh

        # V: unchanged copy of the whole head row.
        d = tl.arange(0, BLOCK_D)
        vmask = ok[:, None] & (d[None, :] < HEAD_DIM)
        v = tl.load(src_v + d[None, :] * s_vd, mask=vmask)
        tl.store(dst_v + d[None, :] * c_vd, v.to(v_cache.dtype.element_ty), mask=vmask)

        # The axis each frequency follows (module docstring), then its token's delta.
        i = tl.arange(0, BLOCK_HALF)
        if INTERLEAVED:
            axis = tl.where((i % 3 == 1) & (i < 3 * SEC_H), 1,
                            tl.where((i % 3 == 2) & (i < 3 * SEC_W), 2, 0))
        else:
            axis = tl.where(i < SEC_T, 0, tl.where(i < SEC_T + SEC_H, 1, 2))
        d_t = tl.load(delta_ptr + t64 * s_dt, mask=ok, other=0).to(tl.int64)
        d_h = tl.load(delta_ptr + t64 * s_dt + s_da, mask=ok, other=0).to(tl.int64)
        d_w = tl.load(delta_ptr + t64 * s_dt + 2 * s_da, mask=ok, other=0).to(tl.int64)
        delta = tl.where(axis[None, :] == 0, d_t[:, None],
                         tl.where(axis[None, :] == 1, d_h[:, None], d_w[:, None]))

        # R(delta) per (token, frequency): row |delta| of the cache, sin negated for
        # negative deltas, normalised to a unit rotation.
        imask = ok[:, None] & (i[None, :] < HALF)
        row = cos_sin_ptr + tl.abs(delta) * s_cp
        cos = tl.load(row + i[None, :] * s_cd, mask=imask, other=1.0).to(tl.float32)
        sin = tl.load(row + (HALF + i[None, :]) * s_cd, mask=imask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(cos * cos + sin * sin)
        cos = cos * inv
        sin = sin * inv * tl.where(delta < 0, -1.0, 1.0)

        out_ty = k_cache.dtype.element_ty
        if IS_NEOX:
            x1 = tl.load(src_k + i[None, :] * s_kd, mask=imask).to(tl.float32)
            x2 = tl.load(src_k + (HALF + i[None, :]) * s_kd, mask=imask).to(tl.float32)
            y1, y2 = _turn(x1, x2, cos, sin)
            tl.store(dst_k + i[None, :] * c_kd, y1.to(out_ty), mask=imask)
            tl.store(dst_k + (HALF + i[None, :]) * c_kd, y2.to(out_ty), mask=imask)
        else:
            j = tl.arange(0, 2 * BLOCK_HALF)
            jmask = ok[:, None] & (j[None, :] < ROT_DIM)
            x = tl.load(src_k + j[None, :] * s_kd, mask=jmask).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_HALF, 2)))
            y1, y2 = _turn(x1, x2, cos, sin)
            y = tl.reshape(tl.join(y1, y2), (BLOCK_T, 2 * BLOCK_HALF))
            tl.store(dst_k + j[None, :] * c_kd, y.to(out_ty), mask=jmask)

        if ROT_DIM < HEAD_DIM:
            e = ROT_DIM + tl.arange(0, BLOCK_TAIL)
            emask = ok[:, None] & (e[None, :] < HEAD_DIM)
            x = tl.load(src_k + e[None, :] * s_kd, mask=emask)
            tl.store(dst_k + e[None, :] * c_kd, x.to(out_ty), mask=emask)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def _check_section(mrope_section: Sequence[int], rotary_dim: int) -> tuple[int, int, int]:
    sec = tuple(mrope_section) if isinstance(mrope_section, (list, tuple)) else None
    if (sec is None or len(sec) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sec)):
        raise ValueError(f"mrope_section must be three integers >= 0 [t, h, w], got {mrope_section!r}")
    if sum(sec) != rotary_dim // 2:
        raise ValueError(f"mrope_section {list(sec)} must sum to rotary_dim / 2 = {rotary_dim // 2}")
    return sec


def _check_mrope_inputs(k_src, v_src, key_cache, value_cache, slot_mapping, deltas,
                        cos_sin_cache, rotary_dim, mrope_section):
    """The 1-D load's checks (shapes, dtypes, one device, rotary_dim, cache width) with
    deltas [T, 3] in place of delta_pos [T], plus the section's."""
    T = k_src.shape[0] if k_src.dim() == 3 else -1
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2 or tuple(deltas.shape) != (T, 3):
        shape = tuple(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas).__name__
        raise ValueError(f"deltas must be a [{T}, 3] tensor of (t, h, w) position deltas, got {shape}")
    _check_inputs(k_src, v_src, key_cache, value_cache, slot_mapping, deltas[:, 0],
                  cos_sin_cache, rotary_dim)
    return _check_section(mrope_section, rotary_dim)


def frequency_axes(mrope_section: Sequence[int], interleaved: bool = False,
                   device=None) -> torch.Tensor:
    """int64 [sum(mrope_section)]: the axis (0 = t, 1 = h, 2 = w) that each rotary
    frequency follows (module docstring)."""
    s_t, s_h, s_w = mrope_section
    i = torch.arange(s_t + s_h + s_w, device=device)
    if interleaved:
        axis = torch.zeros_like(i)
        axis[(i % 3 == 1) & (i < 3 * s_h)] = 1
        axis[(i % 3 == 2) & (i < 3 * s_w)] = 2
        return axis
    return (i >= s_t).long() + (i >= s_t + s_h).long()


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------
def load_chunk_kv_mrope(k_src, v_src, key_cache, value_cache, slot_mapping, deltas,
                        cos_sin_cache, rotary_dim, is_neox, mrope_section, *,
                        interleaved: bool = False, block_t: int = 16, num_warps: int = 4,
                        check_positions: bool = False) -> None:
    """Scatter a chunk's K (re-rotated by per-token M-RoPE deltas) and V into the paged
    cache, in one launch.

    k_src, v_src: [T, Hkv, D], any strides. key_cache, value_cache: 4-D views
    [num_blocks, block_size, Hkv, D], any strides. slot_mapping [T] (-1 = skip);
    deltas [T, 3] = new - old (t, h, w) position ids; cos_sin_cache [max_pos, rotary_dim]
    (the model's M-RoPE cache); mrope_section [s_t, s_h, s_w]. ``check_positions``
    verifies |delta| < max_pos (one device-to-host sync)."""
    zero = torch.zeros(1, dtype=torch.int64, device=k_src.device)
    load_chunk_kv_mrope_layers(k_src[None], v_src[None], [key_cache], [value_cache],
                               slot_mapping, deltas, cos_sin_cache, rotary_dim, is_neox,
                               mrope_section, interleaved=interleaved, offsets=(zero, zero),
                               block_t=block_t, num_warps=num_warps,
                               check_positions=check_positions)


def load_chunk_kv_mrope_layers(k_src, v_src, key_caches, value_caches, slot_mapping, deltas,
                               cos_sin_cache, rotary_dim, is_neox, mrope_section, *,
                               interleaved: bool = False, offsets=None, block_t: int = 16,
                               num_warps: int = 4, check_positions: bool = False) -> None:
    """load_chunk_kv_mrope for L layers in one launch: k_src, v_src [L, T, Hkv, D] (any
    strides); key_caches, value_caches: the L layers' 4-D views, sharing dtype, shape and
    strides (``offsets``: chunk_load.layer_offsets of both, to skip rebuilding them)."""
    if not HAS_TRITON:
        raise RuntimeError("load_chunk_kv_mrope needs triton; use load_chunk_kv_mrope_reference")
    if (not isinstance(k_src, torch.Tensor) or k_src.dim() != 4
            or k_src.shape[0] != len(key_caches) or len(value_caches) != len(key_caches)):
        raise ValueError("k_src must be [L, T, Hkv, D] with one key and one value cache per layer")
    if v_src.shape != k_src.shape:
        raise ValueError(f"v_src {tuple(v_src.shape)} must match k_src {tuple(k_src.shape)}")
    s_t, s_h, s_w = _check_mrope_inputs(k_src[0], v_src[0], key_caches[0], value_caches[0],
                                        slot_mapping, deltas, cos_sin_cache, rotary_dim,
                                        mrope_section)
    if not (k_src.is_cuda or _interpreting()):
        raise ValueError("load_chunk_kv_mrope runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    L, T, H, D = k_src.shape
    if T == 0:
        return
    if check_positions and int(deltas.abs().max()) >= cos_sin_cache.shape[0]:
        raise ValueError("|delta| exceeds the cos_sin_cache length")
    k_off, v_off = offsets if offsets is not None else (layer_offsets(key_caches),
                                                         layer_offsets(value_caches))
    key_cache, value_cache = key_caches[0], value_caches[0]
    _load_chunk_kv_mrope_kernel[(triton.cdiv(T, block_t), H, L)](
        k_src, v_src, key_cache, value_cache, slot_mapping, deltas, cos_sin_cache,
        k_off, v_off, T, key_cache.shape[1],
        k_src.stride(0), v_src.stride(0), *k_src.stride()[1:], *v_src.stride()[1:],
        *key_cache.stride(), *value_cache.stride(),
        *deltas.stride(), *cos_sin_cache.stride(),
        HEAD_DIM=D, ROT_DIM=rotary_dim, IS_NEOX=bool(is_neox),
        SEC_T=s_t, SEC_H=s_h, SEC_W=s_w, INTERLEAVED=bool(interleaved),
        BLOCK_T=block_t,
        BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
        BLOCK_TAIL=triton.next_power_of_2(max(D - rotary_dim, 1)),
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------
# Torch reference (the CPU path)
# --------------------------------------------------------------------------------------
def rotate_keys_mrope_reference(k: torch.Tensor, deltas: torch.Tensor,
                                cos_sin_cache: torch.Tensor, rotary_dim: int, is_neox: bool,
                                mrope_section: Sequence[int], interleaved: bool = False,
                                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return k [T, H, D] with pair i of token t turned by deltas[t, axis(i)] * f_i; math in
    float32 (float64 if k is); ``out_dtype`` defaults to k's dtype."""
    T = k.shape[0]
    if deltas.dim() != 2 or tuple(deltas.shape) != (T, 3):
        raise ValueError(f"deltas must be [{T}, 3], got {tuple(deltas.shape)}")
    _check_section(mrope_section, rotary_dim)
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    half = rotary_dim // 2
    axis = frequency_axes(mrope_section, interleaved, device=k.device)  # [r/2]
    delta = deltas.long().index_select(1, axis)  # [T, r/2]: the delta of each frequency
    cols = torch.arange(half, device=k.device)
    cache = cos_sin_cache.to(compute)
    cos = cache[delta.abs(), cols]  # [T, r/2]
    sin = cache[delta.abs(), half + cols]
    inv = torch.rsqrt(cos * cos + sin * sin)  # unit rotation (YaRN mscale cancels)
    cos = (cos * inv).unsqueeze(1)  # [T, 1, r/2]
    sin = (sin * inv * torch.where(delta < 0, -1.0, 1.0).to(compute)).unsqueeze(1)
    x = k.to(compute)
    out = x.clone()
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rotary_dim] = x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = x1 * cos - x2 * sin
        out[..., 1:rotary_dim:2] = x2 * cos + x1 * sin
    return out.to(out_dtype or k.dtype)


def load_chunk_kv_mrope_reference(k_src, v_src, key_cache, value_cache, slot_mapping, deltas,
                                  cos_sin_cache, rotary_dim, is_neox, mrope_section, *,
                                  interleaved: bool = False) -> None:
    """Torch equivalent of ``load_chunk_kv_mrope`` (same arguments, writes in place)."""
    _check_mrope_inputs(k_src, v_src, key_cache, value_cache, slot_mapping, deltas,
                        cos_sin_cache, rotary_dim, mrope_section)
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    k_src, v_src = k_src.index_select(0, keep), v_src.index_select(0, keep)
    slot, deltas = slot_mapping.index_select(0, keep).long(), deltas.index_select(0, keep)
    if int(deltas.abs().max()) >= cos_sin_cache.shape[0]:
        raise ValueError("|delta| exceeds the cos_sin_cache length")
    block_size = key_cache.shape[1]
    blk, off = slot // block_size, slot % block_size
    key_cache[blk, off] = rotate_keys_mrope_reference(k_src, deltas, cos_sin_cache, rotary_dim,
                                                      is_neox, mrope_section, interleaved,
                                                      out_dtype=key_cache.dtype)
    value_cache[blk, off] = v_src.to(value_cache.dtype)

"""Fused chunk load: copy a cached chunk's K/V into a request's paged cache, re-rotating K.

The store keeps, for every layer, the post-RoPE keys and the values of a chunk computed at
the chunk's local positions p_old(t). In a new prompt token t sits at p_new(t). RoPE turns
the pair (x1, x2) of key dims belonging to frequency f by the angle p*f:

    rope(x, p) = (x1 cos(p f) - x2 sin(p f),  x2 cos(p f) + x1 sin(p f))

Rotations compose, R(a) R(b) = R(a + b), so with delta = p_new - p_old

    K_new = R(delta) K_old                                                     (1)

exactly, for every RoPE whose angle is linear in the position: plain, linear-scaled,
llama3, and dynamic-NTK at a fixed cache. vLLM's ``cos_sin_cache[p] = [cos(p f_i) ...,
sin(p f_i) ...]`` (rotary_dim columns, cos half then sin half) therefore gives R(delta)
from row |delta|, with the sin half negated when delta < 0 (cos is even, sin is odd).
YaRN multiplies the whole cache by a magnitude ``mscale``; the stored key already carries
that factor, so R(delta) must be the *unit* rotation. We divide (cos, sin) by
sqrt(cos^2 + sin^2), which is 1 up to rounding for the other kinds, so (1) also holds
for YaRN. (Phi-3 "longrope", which switches frequency tables by sequence length, does not
compose and is not supported.)

Pairing of key dims, r = rotary_dim:
    neox style (is_neox=True):  x1 = k[:r/2],   x2 = k[r/2:r]
    GPT-J style (is_neox=False): x1 = k[0:r:2], x2 = k[1:r:2]
Dims r..D-1 pass unchanged. V is copied unchanged.

Everything happens in one pass: each program reads a tile of BLOCK_T tokens of one KV
head from the source, rotates K in float32, casts to the cache dtype and scatters K and V
to ``slot = block * block_size + offset`` (slot -1 = skip). Cache views are 4-D
``[num_blocks, block_size, num_kv_heads, head_dim]`` with arbitrary strides, so one
kernel serves FLASH_ATTN (K and V interleaved per token row) and CPU_ATTN (per
(block, head) page of keys then values); see docs/ARCHITECTURE.md, Version-specific code.

The sources are either one gathered tensor [L, T, Hkv, D] with any strides
(``load_chunk_kv_layers``) or, in the engine's GPU path, each chunk's own store tensors
read where they lie (``load_chunk_kv_segments``): a per-token table gives the element
offset of the token's K and V rows from a base pointer, so one launch serves every layer
and every chunk of a request without a gathered copy.

``load_chunk_kv_reference`` is the vectorized torch equivalent that the CPU engine path
uses; it imports no Triton.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the CPU engine path uses the torch reference only.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "layer_offsets",
    "load_chunk_kv",
    "load_chunk_kv_layers",
    "load_chunk_kv_reference",
    "load_chunk_kv_segments",
    "rotate_keys_reference",
]


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rotate_pair(x1, x2, cos, sin):
        """(x1, x2) rotated by the angle whose (cos, sin) are given, in float32."""
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    # T changes with every load: not specialized on (a new "== 1" / "divisible by 16"
    # pattern would compile the kernel again while serving).
    @triton.jit(do_not_specialize=["T", "s_kl", "s_vl"])
    def _load_chunk_kv_kernel(
        k_src, v_src, k_cache, v_cache, slot_ptr, delta_ptr, cos_sin_ptr,
        k_layer_off, v_layer_off,  # per-layer element offsets from k_cache / v_cache
        src_rows,  # SOURCE_TABLE: [3, T] per-token (K row, V row, layer stride) / 16
        T, block_size,
        s_kl, s_vl,  # k_src / v_src layer strides
        s_kt, s_kh, s_kd,  # k_src strides (token, head, dim)
        s_vt, s_vh, s_vd,  # v_src strides
        c_kb, c_ks, c_kh, c_kd,  # key_cache strides (block, slot-in-block, head, dim)
        c_vb, c_vs, c_vh, c_vd,  # value_cache strides
        s_cp, s_cd,  # cos_sin_cache strides (position, column)
        HEAD_DIM: tl.constexpr,
        ROT_DIM: tl.constexpr,
        IS_NEOX: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_HALF: tl.constexpr,  # >= ROT_DIM // 2, power of two
        BLOCK_TAIL: tl.constexpr,  # >= HEAD_DIM - ROT_DIM, power of two
        BLOCK_D: tl.constexpr,  # >= HEAD_DIM, power of two
        SOURCE_TABLE: tl.constexpr,  # sources scattered over many tensors (see above)
    ):
        HALF: tl.constexpr = ROT_DIM // 2
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        # Layer axis: one launch for all layers (each layer's cache is its own tensor,
        # reached by an element offset from the first; small launches would each pay
        # the ramp-up and drain of a kernel).
        layer = tl.program_id(2)
        # Offsets come in units of 16 elements: multiplying by the constant keeps the
        # compiler's alignment facts about the base pointer, so accesses stay vectorized.
        k_cache += tl.load(k_layer_off + layer) * 16
        v_cache += tl.load(v_layer_off + layer) * 16

        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
        ok = t_ok & (slot >= 0)  # slot -1: padding, nothing read or written
        blk = slot // block_size
        off = slot % block_size
        t64 = t.to(tl.int64)

        if SOURCE_TABLE:
            # Each token's rows live in its own chunk's tensor: element offsets from
            # k_src, in units of 16 (alignment kept, as for the layer offsets above).
            k_row = tl.load(src_rows + t, mask=ok, other=0)
            v_row = tl.load(src_rows + T + t, mask=ok, other=0)
            l_stride = tl.load(src_rows + 2 * T + t, mask=ok, other=0)
            src_k = k_src + ((k_row + layer * l_stride) * 16)[:, None] + h * s_kh
            src_v = k_src + ((v_row + layer * l_stride) * 16)[:, None] + h * s_vh
        else:
            src_k = k_src + layer * s_kl + t64[:, None] * s_kt + h * s_kh
            src_v = v_src + layer * s_vl + t64[:, None] * s_vt + h * s_vh
        dst_k = k_cache + blk[:, None] * c_kb + off[:, None] * c_ks + h * c_kh
        dst_v = v_cache + blk[:, None] * c_vb + off[:, None] * c_vs + h * c_vh

        # V: unchanged copy of the whole head row.
        d = tl.arange(0, BLOCK_D)
        vmask = ok[:, None] & (d[None, :] < HEAD_DIM)
        v = tl.load(src_v + d[None, :] * s_vd, mask=vmask)
        tl.store(dst_v + d[None, :] * c_vd, v.to(v_cache.dtype.element_ty), mask=vmask)

        # R(delta): row |delta| of the cache, sin negated for negative deltas, then
        # normalized to a unit rotation (see the module docstring on YaRN's mscale).
        delta = tl.load(delta_ptr + t, mask=ok, other=0)
        adelta = tl.abs(delta).to(tl.int64)
        sign = tl.where(delta < 0, -1.0, 1.0)
        i = tl.arange(0, BLOCK_HALF)
        imask = ok[:, None] & (i[None, :] < HALF)
        row = cos_sin_ptr + adelta[:, None] * s_cp
        cos = tl.load(row + i[None, :] * s_cd, mask=imask, other=1.0).to(tl.float32)
        sin = tl.load(row + (HALF + i[None, :]) * s_cd, mask=imask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(cos * cos + sin * sin)
        cos = cos * inv
        sin = sin * inv * sign[:, None]

        out_ty = k_cache.dtype.element_ty
        if IS_NEOX:
            # Halves: x1 = k[0 : r/2], x2 = k[r/2 : r]; two contiguous loads.
            x1 = tl.load(src_k + i[None, :] * s_kd, mask=imask).to(tl.float32)
            x2 = tl.load(src_k + (HALF + i[None, :]) * s_kd, mask=imask).to(tl.float32)
            y1, y2 = _rotate_pair(x1, x2, cos, sin)
            tl.store(dst_k + i[None, :] * c_kd, y1.to(out_ty), mask=imask)
            tl.store(dst_k + (HALF + i[None, :]) * c_kd, y2.to(out_ty), mask=imask)
        else:
            # Interleaved pairs: load k[0 : r] as one row, split it into even/odd lanes.
            j = tl.arange(0, 2 * BLOCK_HALF)
            jmask = ok[:, None] & (j[None, :] < ROT_DIM)
            x = tl.load(src_k + j[None, :] * s_kd, mask=jmask).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_HALF, 2)))
            y1, y2 = _rotate_pair(x1, x2, cos, sin)
            y = tl.reshape(tl.join(y1, y2), (BLOCK_T, 2 * BLOCK_HALF))
            tl.store(dst_k + j[None, :] * c_kd, y.to(out_ty), mask=jmask)

        if ROT_DIM < HEAD_DIM:
            # Dims beyond rotary_dim pass unchanged.
            e = ROT_DIM + tl.arange(0, BLOCK_TAIL)
            emask = ok[:, None] & (e[None, :] < HEAD_DIM)
            x = tl.load(src_k + e[None, :] * s_kd, mask=emask)
            tl.store(dst_k + e[None, :] * c_kd, x.to(out_ty), mask=emask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_inputs(k_src, v_src, key_cache, value_cache, slot_mapping, delta_pos,
                  cos_sin_cache, rotary_dim):
    """Shape/dtype/device validation shared by the kernel wrapper and the reference."""
    if k_src.dim() != 3 or v_src.shape != k_src.shape:
        raise ValueError(f"k_src and v_src must both be [T, Hkv, D]; got "
                         f"{tuple(k_src.shape)} and {tuple(v_src.shape)}")
    T, H, D = k_src.shape
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must be 4-D views "
                         "[num_blocks, block_size, Hkv, D] of the same shape; got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if tuple(key_cache.shape[2:]) != (H, D):
        raise ValueError(f"cache heads/head_dim {tuple(key_cache.shape[2:])} do not match "
                         f"the chunk's {(H, D)}")
    for name, x in (("slot_mapping", slot_mapping), ("delta_pos", delta_pos)):
        if x.shape != (T,):
            raise ValueError(f"{name} must have shape [{T}], got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if not (0 < rotary_dim <= D) or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in (0, {D}], got {rotary_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim:
        raise ValueError(f"cos_sin_cache must be [max_pos, {rotary_dim}], got "
                         f"{tuple(cos_sin_cache.shape)}")
    for name, x in (("k_src", k_src), ("v_src", v_src), ("key_cache", key_cache),
                    ("value_cache", value_cache), ("cos_sin_cache", cos_sin_cache)):
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    devices = {x.device for x in (k_src, v_src, key_cache, value_cache, slot_mapping,
                                  delta_pos, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def load_chunk_kv(k_src, v_src, key_cache, value_cache, slot_mapping, delta_pos,
                  cos_sin_cache, rotary_dim, is_neox, *, block_t: int = 16,
                  num_warps: int = 4, check_positions: bool = False) -> None:
    """Scatter a chunk's K (re-rotated by ``delta_pos``) and V into the paged cache.

    k_src, v_src: [T, Hkv, D], any strides. key_cache, value_cache: 4-D views
    [num_blocks, block_size, Hkv, D], any strides. slot_mapping [T] (-1 = skip),
    delta_pos [T] = new_pos - old_pos, cos_sin_cache [max_pos, rotary_dim].
    Writes in place, in one launch. ``check_positions`` verifies |delta| < max_pos
    (one device-to-host sync; off by default so the call stays graph-capturable).
    """
    zero = torch.zeros(1, dtype=torch.int64, device=k_src.device)  # one layer, no offset
    load_chunk_kv_layers(k_src[None], v_src[None], [key_cache], [value_cache], slot_mapping,
                         delta_pos, cos_sin_cache, rotary_dim, is_neox, offsets=(zero, zero),
                         block_t=block_t, num_warps=num_warps, check_positions=check_positions)


def layer_offsets(caches: list[torch.Tensor]) -> torch.Tensor:
    """Offsets of each layer's cache view from the first one's, in units of 16 elements
    (int64, on their device): how one launch reaches every layer. All views must share
    dtype, shape and strides, as vLLM's per-layer caches do, and lie a multiple of 16
    elements apart (vLLM's page-sized allocations do); ValueError otherwise."""
    first = caches[0]
    unit = 16 * first.element_size()
    offsets = []
    for c in caches:
        if c.dtype != first.dtype or c.shape != first.shape or c.stride() != first.stride():
            raise ValueError("every layer's cache view must share dtype, shape and strides")
        diff = c.data_ptr() - first.data_ptr()
        if diff % unit:
            raise ValueError("layer caches are not 16 elements apart; load layer by layer")
        offsets.append(diff // unit)
    # Asynchronous: a plain copy to the device makes the host wait for every kernel
    # queued on the stream. Measured on an H200 (Llama-8B shape, a burst of misses on the
    # blend stream): built once per request, that wait put ~30 ms into every step that
    # started a request's load, the probe's slow steps (suite.sh probeprofile).
    return torch.tensor(offsets, dtype=torch.int64).to(first.device, non_blocking=True)


def load_chunk_kv_layers(k_src, v_src, key_caches, value_caches, slot_mapping, delta_pos,
                         cos_sin_cache, rotary_dim, is_neox, *, offsets=None,
                         block_t: int = 16, num_warps: int = 4,
                         check_positions: bool = False) -> None:
    """load_chunk_kv for L layers in one launch: k_src, v_src [L, T, Hkv, D] (layer
    stride free, the rest any strides); key_caches, value_caches: the L layers' 4-D
    views. ``offsets``: (key, value) from layer_offsets(), to skip rebuilding them."""
    if not HAS_TRITON:
        raise RuntimeError("load_chunk_kv needs triton; use load_chunk_kv_reference")
    if k_src.dim() != 4 or k_src.shape[0] != len(key_caches) or len(value_caches) != len(key_caches):
        raise ValueError(f"k_src must be [L, T, Hkv, D] with one cache per layer; got "
                         f"{tuple(k_src.shape)}, {len(key_caches)} key and "
                         f"{len(value_caches)} value caches")
    _check_inputs(k_src[0], v_src[0], key_caches[0], value_caches[0], slot_mapping, delta_pos,
                  cos_sin_cache, rotary_dim)
    if not (k_src.is_cuda or _interpreting()):
        raise ValueError("load_chunk_kv runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    L, T, H, D = k_src.shape
    if T == 0:
        return
    if check_positions and int(delta_pos.abs().max()) >= cos_sin_cache.shape[0]:
        raise ValueError("|delta_pos| exceeds the cos_sin_cache length")
    k_off, v_off = offsets if offsets is not None else (layer_offsets(key_caches),
                                                         layer_offsets(value_caches))
    _launch(k_src, v_src, None, (k_src.stride(0), v_src.stride(0), *k_src.stride()[1:],
                                 *v_src.stride()[1:]),
            key_caches[0], value_caches[0], k_off, v_off, slot_mapping, delta_pos, T, H, L,
            cos_sin_cache, rotary_dim, is_neox, block_t, num_warps)


def load_chunk_kv_segments(segments, key_caches, value_caches, slot_mapping, delta_pos,
                           cos_sin_cache, rotary_dim, is_neox, *, offsets=None,
                           block_t: int = 16, num_warps: int = 4) -> None:
    """load_chunk_kv_layers from many source tensors at once, without gathering them.

    segments: (keys, values, first, count) per source: tokens first .. first+count-1 of
    one chunk's contiguous [L, T_chunk, Hkv, D] K and V (the store's layout); the
    request's tokens are the segments' tokens in order (slot_mapping and delta_pos have
    one entry per token). The kernel reaches each token's rows through a small table of
    element offsets from the first segment's keys, built here on the host and copied
    once: one launch for all layers and all segments, and no gathered copy of the
    request's KV. ValueError where the sources do not allow it (not on the caches'
    device, not contiguous, mixed shapes, rows not 16 elements apart): gather instead.
    """
    import numpy as np

    if not HAS_TRITON:
        raise RuntimeError("load_chunk_kv needs triton; use load_chunk_kv_reference")
    if not segments:
        return
    base = segments[0][0]
    L, _, H, D = base.shape
    row = H * D  # elements per token row of one layer
    if row % 16 or len(key_caches) != L:
        raise ValueError("token rows not 16 elements apart, or layer count mismatch")
    if not (base.is_cuda or _interpreting()):
        raise ValueError("load_chunk_kv runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    unit = 16 * base.element_size()
    # Per segment: where its keys and values start, its chunk length, first token, count.
    cols = np.empty((5, len(segments)), dtype=np.int64)
    checked: set[int] = set()  # a tensor used by many segments (a separator) is checked once
    for i, (keys, values, first, count) in enumerate(segments):
        if id(keys) not in checked:
            if (keys.dtype != base.dtype or values.dtype != base.dtype
                    or keys.device != key_caches[0].device or keys.dim() != 4
                    or tuple(keys.shape[::2]) != (L, H) or keys.shape[3] != D
                    or values.shape != keys.shape
                    or not (keys.is_contiguous() and values.is_contiguous())):
                raise ValueError("segments must be contiguous [L, T, Hkv, D] tensors of one "
                                 "dtype on the caches' device")
            checked.add(id(keys))
        cols[:, i] = (keys.data_ptr(), values.data_ptr(), keys.shape[1], first, count)
    k_at, v_at = cols[0] - base.data_ptr(), cols[1] - base.data_ptr()
    if (k_at % unit).any() or (v_at % unit).any():
        raise ValueError("segment tensors are not 16-element aligned")
    # (K row, V row, layer stride) of each segment's first token, in units of 16.
    starts = np.stack([k_at // unit + cols[3] * (row // 16), v_at // unit + cols[3] * (row // 16),
                       cols[2] * (row // 16)])
    counts = cols[4]
    T = int(counts.sum())
    shape_of_source = base.new_empty(()).expand(T, H, D)  # the checks' view of the sources
    _check_inputs(shape_of_source, shape_of_source, key_caches[0], value_caches[0],
                  slot_mapping, delta_pos, cos_sin_cache, rotary_dim)
    if T == 0:
        return
    seg = np.repeat(np.arange(len(segments)), counts)
    within = np.arange(T, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.ascontiguousarray(starts[:, seg])  # [3, T] row-major, as the kernel reads it
    table[:2] += within * (row // 16)
    # From pageable memory, asynchronously: CUDA stages the few hundred KB at once and
    # the host does not wait for the stream's queued work (a plain copy would). Pinning
    # a fresh host buffer per request cost more (~2 ms at 32K tokens on an H200).
    src_rows = torch.from_numpy(table).to(base.device, non_blocking=True)
    k_off, v_off = offsets if offsets is not None else (layer_offsets(key_caches),
                                                         layer_offsets(value_caches))
    # Strides of one contiguous [L, T, H, D] entry: (layer, token) come from the table.
    strides = (0, 0, row, D, 1, row, D, 1)
    _launch(base, base, src_rows, strides, key_caches[0], value_caches[0], k_off, v_off,
            slot_mapping, delta_pos, T, H, L, cos_sin_cache, rotary_dim, is_neox, block_t,
            num_warps)


def _launch(k_src, v_src, src_rows, src_strides, key_cache, value_cache, k_off, v_off,
            slot_mapping, delta_pos, T, H, L, cos_sin_cache, rotary_dim, is_neox, block_t,
            num_warps):
    """One launch of the load kernel: grid (token tiles, KV heads, layers)."""
    D = key_cache.shape[3]
    half = rotary_dim // 2
    _load_chunk_kv_kernel[(triton.cdiv(T, block_t), H, L)](
        k_src, v_src, key_cache, value_cache, slot_mapping, delta_pos, cos_sin_cache,
        k_off, v_off, src_rows if src_rows is not None else slot_mapping,
        T, key_cache.shape[1],
        *src_strides,
        *key_cache.stride(), *value_cache.stride(),
        *cos_sin_cache.stride(),
        HEAD_DIM=D, ROT_DIM=rotary_dim, IS_NEOX=bool(is_neox),
        BLOCK_T=block_t,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=triton.next_power_of_2(max(D - rotary_dim, 1)),
        BLOCK_D=triton.next_power_of_2(D),
        SOURCE_TABLE=src_rows is not None,
        num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------
# Torch reference (the CPU engine path)
# --------------------------------------------------------------------------------------
def rotate_keys_reference(k: torch.Tensor, delta_pos: torch.Tensor,
                          cos_sin_cache: torch.Tensor, rotary_dim: int, is_neox: bool,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``R(delta_pos[t]) k[t]`` for k [T, H, D]; math in float32 (float64 if k is).

    Vectorized over tokens and heads; ``out_dtype`` defaults to k's dtype.
    """
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    half = rotary_dim // 2
    rows = cos_sin_cache.index_select(0, delta_pos.abs().long()).to(compute)  # [T, r]
    cos, sin = rows[:, :half], rows[:, half:]
    inv = torch.rsqrt(cos * cos + sin * sin)  # unit rotation (YaRN mscale cancels)
    cos = (cos * inv).unsqueeze(1)  # [T, 1, r/2]
    sign = torch.where(delta_pos < 0, -1.0, 1.0).to(compute).view(-1, 1, 1)
    sin = (sin * inv).unsqueeze(1) * sign
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


def rotate_segment_reference(k: torch.Tensor, delta: int, cos_sin_cache: torch.Tensor,
                             rotary_dim: int, is_neox: bool, out: torch.Tensor) -> torch.Tensor:
    """``R(delta) k`` into ``out`` for k [..., D] of one segment (all its tokens move by
    the same delta): one (cos, sin) row broadcast over the rest. The CPU load path; equal
    to rotate_keys_reference with that delta for every token."""
    half = rotary_dim // 2
    row = cos_sin_cache[abs(delta)].float()
    cos, sin = row[:half], row[half:]
    inv = torch.rsqrt(cos * cos + sin * sin)  # unit rotation (YaRN mscale cancels)
    cos, sin = cos * inv, sin * inv * (-1.0 if delta < 0 else 1.0)
    if is_neox:
        x1, x2 = k[..., :half], k[..., half:rotary_dim]
        o1, o2 = out[..., :half], out[..., half:rotary_dim]
    else:
        x1, x2 = k[..., 0:rotary_dim:2], k[..., 1:rotary_dim:2]
        o1, o2 = out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2]
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    a, b = x1.to(compute), x2.to(compute)
    cos, sin = cos.to(compute), sin.to(compute)
    o1.copy_(a * cos - b * sin)
    o2.copy_(b * cos + a * sin)
    if rotary_dim < k.shape[-1]:
        out[..., rotary_dim:] = k[..., rotary_dim:]
    return out


def load_chunk_kv_reference(k_src, v_src, key_cache, value_cache, slot_mapping, delta_pos,
                            cos_sin_cache, rotary_dim, is_neox) -> None:
    """Torch equivalent of ``load_chunk_kv`` (same arguments, writes in place)."""
    _check_inputs(k_src, v_src, key_cache, value_cache, slot_mapping, delta_pos,
                  cos_sin_cache, rotary_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        k_src, v_src = k_src.index_select(0, idx), v_src.index_select(0, idx)
        slot_mapping, delta_pos = slot_mapping.index_select(0, idx), delta_pos.index_select(0, idx)
    if slot_mapping.numel() == 0:
        return
    if int(delta_pos.abs().max()) >= cos_sin_cache.shape[0]:
        raise ValueError("|delta_pos| exceeds the cos_sin_cache length")
    block_size = key_cache.shape[1]
    slot = slot_mapping.long()
    blk, off = slot // block_size, slot % block_size
    # Advanced-index assignment writes through any strided view (both cache layouts).
    key_cache[blk, off] = rotate_keys_reference(k_src, delta_pos, cos_sin_cache, rotary_dim,
                                                is_neox, out_dtype=key_cache.dtype)
    value_cache[blk, off] = v_src.to(value_cache.dtype)

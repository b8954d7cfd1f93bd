"""HilbertA sparse attention: Triton forward kernel, host wrapper, torch reference.

Sequence layout (HilbertA, arXiv 2509.26538; vllm_kvflow.vision.hilbert builds it):
N = S + N_local tokens, [shared | local]. The local part is cut into tiles of g tokens
(the last tile may be shorter). With o = the layer's window offset:

    shared query q < S      attends to every key                    (dense row)
    local query in tile t   attends to keys [0, S) and to the window
                            W(t) = { S + ((t*g + o + i) mod N_local) : 0 <= i < g }

out = softmax(q k^T * sm_scale  masked to the allowed keys) v, computed as a streaming
("online") softmax over key blocks, as in FlashAttention: per query row keep the running
max m, running denominator l and unnormalised accumulator acc; for each key block,
m' = max(m, rowmax(s)), acc = acc * 2^(m - m') + 2^(s - m') v, l likewise; out = acc / l.
Scores are scaled by sm_scale * log2(e) so the exponentials are exp2.

Query blocks never straddle two tiles: grid axis 1 enumerates the shared blocks first
(ceil(S / BLOCK_M) of them, the longest programs, launched first for every head) and then, per tile,
ceil(g / BLOCK_M) blocks whose rows all lie in that tile. So every local block has one
window, g need not be a multiple of BLOCK_M (the last block of a tile is partly masked),
and a wrapped window is two contiguous key ranges, each streamed with plain loads.

Head dims that are not a power of two (80 in Qwen2.5-VL's ViT) are padded to the next
power of two inside the kernel with masked loads; the padded columns read as zero, so
they add nothing to q k^T and are never stored.

Importing this module does not need triton: without it the kernel is absent and only
the torch reference and mask helpers work (the CPU path). TRITON_INTERPRET is read when
this module is imported (at @triton.jit), so the interpreter tests set it before import.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "hilbert_attention",
    "hilbert_attention_reference",
    "hilbert_attention_sdpa",
    "hilbert_attention_mask",
    "hilbert_mask_mod",
    "pair_count",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- mask & reference

def _check_layout(n_tokens: int, n_shared: int, tile_size: int, offset: int) -> int:
    """Validate the [shared | local] parameters; return N_local."""
    for name, val in (("n_shared", n_shared), ("tile_size", tile_size), ("offset", offset)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if not 0 <= n_shared < n_tokens:
        raise ValueError(f"n_shared must lie in [0, {n_tokens}) for {n_tokens} tokens "
                         f"(at least one local token), got {n_shared}")
    n_local = n_tokens - n_shared
    if not 1 <= tile_size <= n_local:
        raise ValueError(f"tile_size must lie in [1, N_local={n_local}], got {tile_size}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return n_local


def hilbert_attention_mask(n_tokens: int, n_shared: int, tile_size: int, offset: int = 0,
                           device=None) -> torch.Tensor:
    """Boolean [N, N] mask, True where query row i may attend to key column j."""
    n_local = _check_layout(n_tokens, n_shared, tile_size, offset)
    idx = torch.arange(n_tokens, device=device)
    q, k = idx[:, None], idx[None, :]
    tile = (q - n_shared).clamp(min=0) // tile_size
    start = (tile * tile_size + offset) % n_local           # window start, local coords
    in_window = torch.remainder((k - n_shared) - start, n_local) < tile_size
    return (q < n_shared) | (k < n_shared) | in_window


def hilbert_mask_mod(n_shared, n_local, tile_size, offset):
    """The same mask as a FlexAttention mask_mod(b, h, q_idx, kv_idx).

    The four parameters may be python ints or 0-d tensors (tensors let one compiled
    kernel serve every tile count and offset)."""

    def mask_mod(b, h, q_idx, kv_idx):
        tile = (q_idx - n_shared) // tile_size
        start = (tile * tile_size + offset) % n_local
        in_window = ((kv_idx - n_shared) - start) % n_local < tile_size
        return (q_idx < n_shared) | (kv_idx < n_shared) | in_window

    return mask_mod


def hilbert_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                n_shared: int, tile_size: int, offset: int = 0,
                                sm_scale: Optional[float] = None) -> torch.Tensor:
    """Dense float32 attention under hilbert_attention_mask. q, k, v: [B, H, N, D].
    Returns float32 [B, H, N, D]. Memory is O(N^2): for tests and the CPU path."""
    n = q.shape[-2]
    mask = hilbert_attention_mask(n, n_shared, tile_size, offset, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float())


def hilbert_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           n_shared: int, tile_size: int, offset: int = 0,
                           sm_scale: Optional[float] = None) -> torch.Tensor:
    """The same attention through torch SDPA, one call per group of rows: shared rows over
    all keys, then each tile's rows over [shared keys | its window]. Exact (no mask is
    materialised), O(N (S + g)) memory, any device: the CPU path of the vision hook.
    q, k, v: [B, H, N, D]; returns q's dtype."""
    import torch.nn.functional as F

    n = q.shape[-2]
    n_local = _check_layout(n, n_shared, tile_size, offset)
    out = torch.empty_like(q)
    if n_shared:
        out[..., :n_shared, :] = F.scaled_dot_product_attention(
            q[..., :n_shared, :], k, v, scale=sm_scale)
    local = torch.arange(n_local, device=q.device)
    for t in range(-(-n_local // tile_size)):
        rows = slice(n_shared + t * tile_size, n_shared + min((t + 1) * tile_size, n_local))
        window = n_shared + (t * tile_size + offset + local[:tile_size]) % n_local
        keys = torch.cat([torch.arange(n_shared, device=q.device), window])
        out[..., rows, :] = F.scaled_dot_product_attention(
            q[..., rows, :], k.index_select(-2, keys), v.index_select(-2, keys), scale=sm_scale)
    return out


def pair_count(n_tokens: int, n_shared: int, tile_size: int) -> int:
    """Number of (query, key) pairs HilbertA computes; dense computes n_tokens**2."""
    n_local = n_tokens - n_shared
    return n_shared * n_tokens + n_local * (n_shared + tile_size)


# ----------------------------------------------------------------------------- Triton kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference path still works, the kernel is absent
    triton = None
    tl = None

    def _jit(fn):
        return fn
else:
    _jit = triton.jit


@_jit
def _attn_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, offs_d, key_lo, key_hi,
               stride_kn, stride_vn, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block at rows key_lo + offs_n: fold 2^(s - m) v into acc."""
    rows = key_lo + offs_n                                      # [BLOCK_N]
    k_off = rows[None, :] * stride_kn + offs_d[:, None]         # [BLOCK_D, BLOCK_N]
    v_off = rows[:, None] * stride_vn + offs_d[None, :]         # [BLOCK_N, BLOCK_D]
    if MASK_KEYS:  # tail block of the range: rows >= key_hi read as zero
        row_ok = rows < key_hi
        if BLOCK_D != HEAD_DIM:
            kt = tl.load(k_ptrs + k_off, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs + v_off, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            kt = tl.load(k_ptrs + k_off, mask=row_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + v_off, mask=row_ok[:, None], other=0.0)
    else:  # full block: every row < key_hi, in bounds by construction
        if BLOCK_D != HEAD_DIM:
            kt = tl.load(k_ptrs + k_off, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs + v_off, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            kt = tl.load(k_ptrs + k_off)
            v = tl.load(v_ptrs + v_off)
    # s = q k^T in log2 units; masked keys get -inf so 2^(s - m) = 0 for them.
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASK_KEYS:
        s = tl.where(row_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)                           # rescale old terms
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new

@_jit
def _attn_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, key_lo, key_hi,
                stride_kn, stride_vn, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Stream the contiguous key rows [key_lo, key_hi) through the online softmax."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_full = (key_hi - key_lo) // BLOCK_N * BLOCK_N
    for start in range(key_lo, key_lo + n_full, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, offs_d,
                                   start, key_hi, stride_kn, stride_vn, qk_scale,
                                   HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    if key_lo + n_full < key_hi:
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, offs_d,
                                   key_lo + n_full, key_hi, stride_kn, stride_vn, qk_scale,
                                   HEAD_DIM, BLOCK_D, True, DOT_PRECISION)
    return acc, l_i, m_i

@_jit
def _hilbert_attn_fwd(Q, K, V, Out,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on,
                      n_heads, n_tokens, n_shared, tile_size, offset, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)     # (batch, head), fastest-varying in launch order
    pid = tl.program_id(1)    # query block: shared blocks first, then per tile
    b = bh // n_heads
    h = bh % n_heads
    n_local = n_tokens - n_shared
    n_shared_blocks = (n_shared + BLOCK_M - 1) // BLOCK_M
    blocks_per_tile = (tile_size + BLOCK_M - 1) // BLOCK_M

    # Which query rows this program owns: [row_lo, row_hi), all shared or all in one tile.
    local_pid = tl.maximum(pid - n_shared_blocks, 0)
    tile = local_pid // blocks_per_tile
    sub = local_pid % blocks_per_tile
    if pid < n_shared_blocks:
        row_lo = pid * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, n_shared)
    else:
        tile_lo = n_shared + tile * tile_size
        row_lo = tile_lo + sub * BLOCK_M
        row_hi = tl.minimum(tl.minimum(row_lo + BLOCK_M, tile_lo + tile_size), n_tokens)

    offs_m = row_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < row_hi
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    q_off = offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_base + q_off, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if pid < n_shared_blocks:
        # Shared queries: every key.
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, 0, n_tokens,
                                    stride_kn, stride_vn, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    else:
        # Local queries of one tile: shared keys [0, S), then the tile's window,
        # local [w0, w0 + g) mod N_local, as at most two contiguous ranges.
        if n_shared > 0:
            acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, 0, n_shared,
                                        stride_kn, stride_vn, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        w0 = (tile * tile_size + offset) % n_local
        first_end = tl.minimum(w0 + tile_size, n_local)          # end of piece 1
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base,
                                    n_shared + w0, n_shared + first_end,
                                    stride_kn, stride_vn, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        wrapped = w0 + tile_size - first_end                    # piece 2: [0, wrapped)
        if wrapped > 0:
            acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base,
                                        n_shared, n_shared + wrapped,
                                        stride_kn, stride_vn, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    # Every row saw at least one key (g >= 1), so l_i > 0 for real rows.
    out = acc / l_i[:, None]
    o_off = offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_base + o_off, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))



# Configurations swept on an H200 at every benchmark size (benchmarks/HILBERT_NOTES.md).
SWEEP_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
]


def default_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch configuration: for 16-bit inputs the sweep's winner at every size (64 x 64,
    4 warps, 3 stages); fp32 and head_dim > 128 tiles take twice the bytes, so smaller."""
    if _interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def hilbert_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      n_shared: int, tile_size: int, offset: int = 0,
                      sm_scale: Optional[float] = None, *, out: Optional[torch.Tensor] = None,
                      config: Optional[dict] = None) -> torch.Tensor:
    """HilbertA attention of q, k, v: [B, H, N, D] in the [shared | local] layout.

    n_shared: leading tokens that are shared (text + central block); tile_size: g;
    offset: this layer's window offset (vllm_kvflow.vision.hilbert.sliding_offset).
    Any strides are accepted as long as the head dim is contiguous. Returns [B, H, N, D]
    in q's dtype (or writes into `out`)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        raise TypeError("q, k, v must be torch tensors")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, N, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    bsz, n_heads, n_tokens, head_dim = q.shape
    if bsz < 1 or n_heads < 1:
        raise ValueError(f"batch and heads must be >= 1, got {bsz}, {n_heads}")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim must lie in [1, 256], got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head dim (stride(-1) == 1)")
    _check_layout(n_tokens, n_shared, tile_size, offset)
    if triton is None:
        raise RuntimeError("triton is not installed; use hilbert_attention_reference")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1); "
                         "use hilbert_attention_reference on CPU")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must match q in shape, dtype and device, with a contiguous head dim")

    if config is not None:
        unknown = set(config) - {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        if unknown or not {"BLOCK_M", "BLOCK_N"} <= set(config):
            raise ValueError("config needs BLOCK_M and BLOCK_N (optional num_warps, "
                             f"num_stages), got {sorted(config)}")
        for name in ("BLOCK_M", "BLOCK_N"):
            val = config[name]
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    # Offsets are int32 inside the kernel except the batch/head bases.
    if max(n_tokens * q.stride(-2), n_tokens * k.stride(-2), n_tokens * v.stride(-2)) >= 2**31:
        raise ValueError("one (batch, head) slice exceeds 2^31 elements")

    n_local = n_tokens - n_shared
    offset = offset % n_local
    n_tiles = -(-n_local // tile_size)

    if config is None:
        config = default_config(head_dim, q.dtype)
    bm = config["BLOCK_M"]
    # Axis 0 runs over (batch, head) and varies fastest in launch order, so the long
    # shared-query programs of every head start first and the short local ones fill in.
    grid = (bsz * n_heads, -(-n_shared // bm) + n_tiles * -(-tile_size // bm))
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    _hilbert_attn_fwd[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, n_tokens, n_shared, tile_size, offset,
        scale * 1.4426950408889634,                 # sm_scale * log2(e): exp2 softmax
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton_next_pow2(head_dim)),
        BLOCK_M=bm, BLOCK_N=config["BLOCK_N"],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

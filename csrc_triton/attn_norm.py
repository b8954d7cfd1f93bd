"""Attention-norm scoring of context tokens (infoflow's signal; docs/ARCHITECTURE.md, Methods).

Question rows i (queries q[i, h] at positions q_pos[i]) attend causally to the keys of
one sequence. With GQA keys expanded to query heads (head h reads KV head h // G):

    A[i, h, k] = exp(q[i,h] . k[k] * scale - lse[i, h])        for k <= q_pos[i]
    lse[i, h]  = log sum_{j <= q_pos[i], j < seq_len} exp(q[i,h] . k[j] * scale)
    s_k        = || (1/Hq) sum_h A[:, h, k] ||_2   (L2 norm over question rows)

for every context column k < num_context. The full probability tensor [Nq, Hq, Nk] is
never formed:

  pass 1 (``_row_lse_kernel``): per (question-row tile, KV head, key split) the online
      max/sum of exp over the split's keys; the splits are merged with a log-sum-exp in
      torch (a [splits, Nq, Hq] tensor). Splitting the keys (flash-decoding style) keeps
      the GPU full although there are only 32-64 question rows.
  pass 2 (``_column_norm_kernel``): one program per BLOCK_N context columns loops over
      the question-row tiles and the KV heads, recomputes q k^T, turns it into
      probabilities with the pass-1 lse, sums the G heads of the group in registers
      (tile rows are (query, head-in-group) pairs), accumulates the head sum, and
      reduces the squares over rows. Output: s [num_context] float32.

Keys are read from a paged cache: ``key_cache`` is a 4-D view
[num_blocks, block_size, Hkv, D] with any strides and ``block_table`` [max_blocks] the
sequence's page list. A dense key tensor K [Nk, Hkv, D] (positions 0..Nk-1) is the
special case ``attn_norm_dense``: one page of Nk slots, ``K.unsqueeze(0)`` and
``block_table = [0]``. The question's own keys are expected in the cache (positions
q_pos), since full prefill's softmax normalizes over them too.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "attn_norm", "attn_norm_dense", "attn_norm_reference"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _question_tile(q_ptr, qpos_ptr, r0, Nq, kvh, s_qt, s_qh, s_qd,
                       G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows (question r0 + r // G_PAD, head kvh*G + r % G_PAD) of one KV-head group."""
        r = tl.arange(0, BLOCK_R * G_PAD)
        qi = r0 + r // G_PAD
        g = r % G_PAD
        row_ok = (qi < Nq) & (g < G)
        head = kvh * G + g
        pos = tl.load(qpos_ptr + qi, mask=row_ok, other=0)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + qi[:, None].to(tl.int64) * s_qt + head[:, None] * s_qh
                    + d[None, :] * s_qd,
                    mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        return q, qi, head, row_ok, pos

    @triton.jit
    def _key_tile_t(k_base, bt, n, n_ok, block_size, c_kb, c_ks, c_kd,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """K^T [BLOCK_D, BLOCK_N] for key positions n, read through the page table."""
        page = tl.load(bt + n // block_size, mask=n_ok, other=0).to(tl.int64)
        off = page * c_kb + (n % block_size).to(tl.int64) * c_ks
        d = tl.arange(0, BLOCK_D)
        return tl.load(k_base + off[None, :] + d[:, None] * c_kd,
                       mask=n_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)

    # Arguments that change from call to call are not specialized on (Triton would
    # compile again for each new "== 1" / "divisible by 16" pattern while serving).
    @triton.jit(do_not_specialize=["Nq", "seq_len", "keys_per_split", "s_ps"])
    def _row_lse_kernel(
        q_ptr, qpos_ptr, k_cache, bt, part_ptr,
        Nq, seq_len, keys_per_split, qk_scale, block_size,
        s_qt, s_qh, s_qd, c_kb, c_ks, c_kh, c_kd, s_ps, s_pt, s_ph,
        G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Partial log2-sum-exp2 of s = q k^T * scale * log2(e) over one key split."""
        r0 = tl.program_id(0) * BLOCK_R
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        q, qi, head, row_ok, pos = _question_tile(
            q_ptr, qpos_ptr, r0, Nq, kvh, s_qt, s_qh, s_qd, G, G_PAD, HEAD_DIM,
            BLOCK_R, BLOCK_D)
        hi_pos = tl.max(tl.where(row_ok, pos, -1), 0)
        lo = split * keys_per_split
        hi = tl.minimum(tl.minimum(lo + keys_per_split, seq_len), hi_pos + 1)
        k_base = k_cache + kvh * c_kh
        m_i = tl.full([BLOCK_R * G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R * G_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kt = _key_tile_t(k_base, bt, n, n_ok, block_size, c_kb, c_ks, c_kd,
                             HEAD_DIM, BLOCK_D)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        part = tl.where(l_i > 0.0, m_i + tl.log2(l_i), float("-inf"))
        tl.store(part_ptr + split * s_ps + qi * s_pt + head * s_ph, part, mask=row_ok)

    @triton.jit(do_not_specialize=["Nq", "num_context", "out_len"])
    def _column_norm_kernel(
        q_ptr, qpos_ptr, k_cache, bt, lse_ptr, out_ptr,
        Nq, num_context, out_len, qk_scale, inv_heads, block_size,
        s_qt, s_qh, s_qd, c_kb, c_ks, c_kh, c_kd, s_lt, s_lh,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, CONTEXT_ON_DEVICE: tl.constexpr,
    ):
        """s[n] = sqrt(sum_i (mean_h A[i, h, n])^2) for BLOCK_N context columns n.

        CONTEXT_ON_DEVICE: num_context is a pointer to the count (a CUDA graph replays
        one launch for any context length up to out_len); columns from it up to out_len
        get 0."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if CONTEXT_ON_DEVICE:
            num_context = tl.load(num_context)
        n_ok = n < num_context
        col_sq = tl.zeros([BLOCK_N], tl.float32)
        # No context column in this program: skip the row loop, store zeros.
        rows = tl.where(tl.program_id(0) * BLOCK_N < num_context, Nq, 0)
        for r0 in range(0, rows, BLOCK_R):
            head_sum = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)  # sum_h A[i, h, n]
            for kvh in range(HKV):
                q, qi, head, row_ok, pos = _question_tile(
                    q_ptr, qpos_ptr, r0, Nq, kvh, s_qt, s_qh, s_qd, G, G_PAD, HEAD_DIM,
                    BLOCK_R, BLOCK_D)
                kt = _key_tile_t(k_cache + kvh * c_kh, bt, n, n_ok, block_size,
                                 c_kb, c_ks, c_kd, HEAD_DIM, BLOCK_D)
                lse = tl.load(lse_ptr + qi * s_lt + head * s_lh, mask=row_ok, other=0.0)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
                p = tl.exp2(s - lse[:, None])
                visible = row_ok[:, None] & n_ok[None, :] & (n[None, :] <= pos[:, None])
                p = tl.where(visible, p, 0.0)
                # Rows are (question, head-in-group) pairs: fold the group's heads.
                head_sum += tl.sum(tl.reshape(p, (BLOCK_R, G_PAD, BLOCK_N)), 1)
            a = head_sum * inv_heads
            col_sq += tl.sum(a * a, 0)
        tl.store(out_ptr + n, tl.sqrt(col_sq), mask=n < out_len)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_inputs(q, key_cache, block_table, seq_len, q_pos, num_context):
    if q.dim() != 3:
        raise ValueError(f"q must be [Nq, Hq, D], got {tuple(q.shape)}")
    Nq, Hq, D = q.shape
    if key_cache.dim() != 4 or key_cache.shape[3] != D:
        raise ValueError(f"key_cache must be a 4-D view [num_blocks, block_size, Hkv, {D}], "
                         f"got {tuple(key_cache.shape)}")
    Hkv = key_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if not q.dtype.is_floating_point or key_cache.dtype != q.dtype:
        raise ValueError(f"q and key_cache must share one float dtype; got {q.dtype}, "
                         f"{key_cache.dtype}")
    if block_table.dim() != 1 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be a 1-D int32/int64 page list of the sequence")
    if q_pos.shape != (Nq,) or q_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_pos must be int32/int64 [{Nq}], got {q_pos.dtype} "
                         f"{tuple(q_pos.shape)}")
    if block_table.numel() * key_cache.shape[1] < seq_len:
        raise ValueError(f"block_table covers {block_table.numel() * key_cache.shape[1]} "
                         f"slots < seq_len {seq_len}")
    if not 0 <= num_context <= seq_len:
        raise ValueError(f"num_context must be in [0, seq_len={seq_len}], got {num_context}")
    devices = {x.device for x in (q, key_cache, block_table, q_pos)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _default_config(head_dim: int, dtype: torch.dtype, G_PAD: int) -> dict:
    rows = 64 if head_dim <= 128 else 32  # tile rows = BLOCK_R * G_PAD
    if dtype == torch.float32:
        rows = 32
    return dict(BLOCK_ROWS=max(rows, G_PAD, 16), BLOCK_N=64 if head_dim <= 128 else 32,
                num_warps=4, num_stages=2)


def attn_norm(q, key_cache, block_table, seq_len: int, q_pos, num_context,
              scale: float, out: torch.Tensor | None = None,
              config: dict | None = None, max_context: int | None = None) -> torch.Tensor:
    """Attention-norm score s [num_context] (float32) of one sequence's context tokens.

    q [Nq, Hq, D] question rows at positions q_pos [Nq]; key_cache a 4-D view
    [num_blocks, block_size, Hkv, D]; block_table [max_blocks] the sequence's pages;
    seq_len keys in the cache (context + question), or an upper bound; scale the
    softmax scale; ``out`` an optional float32 [num_context] destination. Two launches
    (row lse, column norms) and a small torch merge; no host sync.

    For CUDA graphs, num_context may be a one-element int32 tensor on q's device, read
    by the kernel, with ``max_context`` (int) its largest value: the result then has
    max_context entries, zero from num_context on. A row at position -1 sees no key and
    adds nothing (how a graph pads its question rows).
    """
    if not HAS_TRITON:
        raise RuntimeError("attn_norm needs triton; use attn_norm_reference")
    context_on_device = isinstance(num_context, torch.Tensor)
    if context_on_device:
        if max_context is None or num_context.numel() != 1 or num_context.dtype != torch.int32:
            raise ValueError("a device num_context must be a one-element int32 tensor, "
                             "with max_context given")
        context_arg, num_context = num_context, int(max_context)
    seq_len, num_context = int(seq_len), int(num_context)
    if not context_on_device:
        context_arg = num_context
    _check_inputs(q, key_cache, block_table, seq_len, q_pos, num_context)
    if not (q.is_cuda or _interpreting()):
        raise ValueError("attn_norm runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    Nq, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    if out is None:
        out = torch.empty(num_context, dtype=torch.float32, device=q.device)
    elif out.shape != (num_context,) or out.dtype != torch.float32 or out.device != q.device:
        raise ValueError(f"out must be float32 [{num_context}] on {q.device}")
    if num_context == 0 or Nq == 0:
        return out.zero_()
    G = Hq // Hkv
    G_PAD = triton.next_power_of_2(G)
    cfg = dict(_default_config(D, q.dtype, G_PAD), **(config or {}))
    n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    block_r = max(cfg["BLOCK_ROWS"], G_PAD, 16) // G_PAD
    block_n = cfg["BLOCK_N"]
    block_d = max(triton.next_power_of_2(D), 16)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    common = dict(G=G, G_PAD=G_PAD, HEAD_DIM=D, BLOCK_R=block_r, BLOCK_N=block_n,
                  BLOCK_D=block_d, DOT_PRECISION=prec, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    qk_scale = scale * LOG2E

    # Pass 1: split the keys so that (row tiles x KV heads x splits) fills the GPU.
    row_tiles = triton.cdiv(Nq, block_r)
    target = 2 * n_sm
    splits = max(1, min(triton.cdiv(seq_len, 4 * block_n),
                        triton.cdiv(target, row_tiles * Hkv)))
    keys_per_split = triton.cdiv(triton.cdiv(seq_len, splits), block_n) * block_n
    splits = triton.cdiv(seq_len, keys_per_split)
    part = torch.empty(splits, Nq, Hq, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(row_tiles, Hkv, splits)](
        q, q_pos, key_cache, block_table, part,
        Nq, seq_len, keys_per_split, qk_scale, key_cache.shape[1],
        *q.stride(), *key_cache.stride(), *part.stride(), **common)
    lse2 = torch.logsumexp(part * LN2, dim=0) * LOG2E  # [Nq, Hq], log2 units

    # Pass 2: column sums of head-averaged probabilities, squared and summed over rows.
    _column_norm_kernel[(triton.cdiv(num_context, block_n),)](
        q, q_pos, key_cache, block_table, lse2, out,
        Nq, context_arg, num_context, qk_scale, 1.0 / Hq, key_cache.shape[1],
        *q.stride(), *key_cache.stride(), *lse2.stride(), HKV=Hkv,
        CONTEXT_ON_DEVICE=context_on_device, **common)
    return out


def attn_norm_dense(q, k, q_pos, num_context: int, scale: float, **kwargs) -> torch.Tensor:
    """``attn_norm`` over dense keys k [Nk, Hkv, D] at positions 0..Nk-1."""
    if k.dim() != 3:
        raise ValueError(f"k must be [Nk, Hkv, D], got {tuple(k.shape)}")
    table = torch.zeros(1, dtype=torch.int32, device=k.device)
    return attn_norm(q, k.unsqueeze(0), table, k.shape[0], q_pos, num_context, scale, **kwargs)


# --------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------
def attn_norm_reference(q, key_cache, block_table, seq_len: int, q_pos, num_context: int,
                        scale: float, compute_dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Torch equivalent of ``attn_norm``; pass ``compute_dtype=torch.float64`` for an oracle.

    Materializes [Hq/Hkv, Nq, seq_len] per KV head (fine for the CPU path's sizes).
    Returns s [num_context] in ``compute_dtype``.
    """
    seq_len, num_context = int(seq_len), int(num_context)
    _check_inputs(q, key_cache, block_table, seq_len, q_pos, num_context)
    Nq, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    G = Hq // Hkv
    block_size = key_cache.shape[1]
    n_blocks = -(-seq_len // block_size)
    keys = key_cache[block_table[:n_blocks].long()].reshape(-1, Hkv, D)[:seq_len]
    keys = keys.to(compute_dtype)
    visible = (torch.arange(seq_len, device=q.device)[None, :]
               <= q_pos[:, None].to(torch.int64))  # [Nq, Nk]
    head_sum = torch.zeros(Nq, num_context, dtype=compute_dtype, device=q.device)
    for kvh in range(Hkv):
        qg = q[:, kvh * G:(kvh + 1) * G].to(compute_dtype).transpose(0, 1)  # [G, Nq, D]
        scores = torch.matmul(qg, keys[:, kvh].T) * scale  # [G, Nq, Nk]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        head_sum += probs[..., :num_context].sum(0)
    return torch.linalg.vector_norm(head_sum / Hq, dim=0)

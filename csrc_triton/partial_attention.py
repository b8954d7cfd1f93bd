"""Partial-prefill attention: queries at arbitrary positions over a paged KV cache.

The selective recompute (docs/ARCHITECTURE.md, Methods: partial prefill) refreshes only
a subset of the context tokens. Their queries sit at arbitrary (sorted) global positions
and attend to the whole mixed cache with the causal rule of full prefill:

    out[i, h] = sum_{j <= pos_i, j < seq_len} softmax_j(q[i, h] . k[j, h/G] * scale) v[j, h/G]

G = Hq / Hkv query heads share one KV head (GQA). A batch holds B sequences: sequence b
owns query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 with positions q_pos[row], keys
0..seq_lens[b]-1 in cache blocks block_table[b, :]. Key j of sequence b lives in page
``block_table[b, j // block_size]`` at offset ``j % block_size``; the cache views are 4-D
``[num_blocks, block_size, Hkv, D]`` with arbitrary strides (FLASH_ATTN or CPU_ATTN).

Kernel layout (after the Triton fused-attention tutorial). One program owns BLOCK_Q
queries of one sequence and one KV head; its tile rows are the G query heads of each of
those queries, M = BLOCK_Q * G_PAD rows, so every K/V tile loaded from the cache serves
all heads of the group. Online softmax in the log2 domain (exp2 with scale*log2(e)),
float32 accumulators, dot operands in the input dtype. Keys below the smallest position
of the tile are visible to every row and are processed without a mask; only the band
between the smallest and the largest position pays for the causal mask. Each key
tile's cache pages are read one iteration ahead of its K/V, so that the software
pipeliner (num_stages) can fetch K/V tiles ahead of the dots.

Schedule. A program's work grows with its queries' positions, so the order in which
programs start decides the tail. The grid is flat and issued longest-first across all
KV heads: the last query block (highest positions) of every KV head, then the one
before, and so on (for sorted positions this is the longest-processing-time order;
an x/y grid of blocks per head would start each head's short blocks before the next
head's long ones). Each program finds its sequence from cu_seqlens_q in-kernel, so
the call is one launch. When there are fewer programs than two waves on the GPU
(short contexts), each block's keys are also split into ranges handled by separate
programs that write unnormalized float32 partials (acc, m, l); a second launch merges
them: out = sum_s 2^(m_s-M) acc_s / sum_s 2^(m_s-M) l_s.

``partial_attention_reference`` gathers each sequence's keys through the block table and
does a masked float32 softmax in torch; it is the CPU engine path and the test oracle.
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

__all__ = ["HAS_TRITON", "partial_attention", "partial_attention_reference"]

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tile_pages(bt_row, start, seq_len, block_size, BLOCK_N: tl.constexpr):
        """Cache page of each key start .. start+BLOCK_N-1, from one block-table row."""
        n = start + tl.arange(0, BLOCK_N)
        return tl.load(bt_row + n // block_size, mask=n < seq_len, other=0).to(tl.int64)

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, row_pos, k_base, v_base, page, start, seq_len,
                      block_size, c_kb, c_ks, c_kd, c_vb, c_vs, c_vd, qk_scale,
                      MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
        """One BLOCK_N slice of keys (in cache pages `page`): s = q k^T, online-softmax
        update of (acc, m, l).

        m_i is the running row max of s * qk_scale (log2 units), l_i the running sum of
        exp2(s * qk_scale - m_i), acc the running sum of exp2(s * qk_scale - m_i) v.
        """
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        n_ok = n < seq_len
        slot = (n % block_size).to(tl.int64)
        kv_k = page * c_kb + slot * c_ks
        kv_v = page * c_vb + slot * c_vs
        # K rows as the cache stores them, [N, D], transposed for the dot (1-2% faster
        # than loading [D, N] directly on an H200).
        k = tl.load(k_base + kv_k[:, None] + d[None, :] * c_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N]
        if MASKED:
            visible = (n[None, :] <= row_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * qk_scale - m_safe[:, None])  # one FMA per score (qk_scale > 0)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_v[:, None] + d[None, :] * c_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    # Arguments that change from call to call are not specialized on (Triton would
    # compile again for each new "== 1" / "divisible by 16" pattern while serving).
    @triton.jit(do_not_specialize=["num_seqs", "max_q_blocks", "num_splits", "keys_per_split",
                                   "s_bt", "s_as", "s_ms"])
    def _partial_attention_kernel(
        q_ptr, k_cache, v_cache, out_ptr, block_table, seq_lens, cu_q, q_pos,
        part_acc, part_m, part_l,
        num_seqs, num_kv_heads, max_q_blocks, num_splits, qk_scale, block_size, keys_per_split,
        s_qt, s_qh, s_qd,
        s_ot, s_oh, s_od,
        c_kb, c_ks, c_kh, c_kd,
        c_vb, c_vs, c_vh, c_vd,
        s_bt,
        s_as, s_at, s_ah,  # part_acc strides (split, query, head); dim stride 1
        s_ms, s_mt, s_mh,  # part_m / part_l strides
        G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_B: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
        # Flat grid, longest work first: query blocks from the last (highest positions)
        # down; the key splits of a block, then its KV heads, are next to each other.
        pid = tl.program_id(0)
        kvh = pid % num_kv_heads
        split = (pid // num_kv_heads) % num_splits
        blk = max_q_blocks - 1 - pid // (num_kv_heads * num_splits)

        # Which sequence owns query block `blk`: the number of sequences whose query
        # blocks all come before it (blk_end[b] = query blocks of sequences 0..b).
        b_idx = tl.arange(0, BLOCK_B)
        b_ok = b_idx < num_seqs
        n_q = (tl.load(cu_q + b_idx + 1, mask=b_ok, other=0)
               - tl.load(cu_q + b_idx, mask=b_ok, other=0))
        n_blk = (n_q + BLOCK_Q - 1) // BLOCK_Q
        blk_end = tl.cumsum(n_blk, 0)
        b = tl.sum((blk_end <= blk).to(tl.int32), 0)
        if b >= num_seqs:
            return  # max_q_blocks is an upper bound on the number of query blocks
        blk_start = tl.sum(tl.where(b_idx == b, blk_end - n_blk, 0), 0)
        q_lo = tl.load(cu_q + b)
        q_hi = tl.load(cu_q + b + 1)
        q_start = q_lo + (blk - blk_start) * BLOCK_Q
        seq_len = tl.load(seq_lens + b)
        bt_row = block_table + b.to(tl.int64) * s_bt

        # Tile rows: row r is query q_start + r // G_PAD, head kvh * G + r % G_PAD.
        r = tl.arange(0, BLOCK_M)
        qi = q_start + r // G_PAD
        g = r % G_PAD
        row_ok = (qi < q_hi) & (g < G)
        head = kvh * G + g
        row_pos = tl.load(q_pos + qi, mask=row_ok, other=0)
        lo_pos = tl.min(tl.where(row_ok, row_pos, 2147483647), 0)
        hi_pos = tl.max(tl.where(row_ok, row_pos, -1), 0)

        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        qi64 = qi.to(tl.int64)
        q = tl.load(q_ptr + qi64[:, None] * s_qt + head[:, None] * s_qh + d[None, :] * s_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = k_cache + kvh * c_kh
        v_base = v_cache + kvh * c_vh

        # Keys [0, full_end) are <= every row's position: no mask needed.
        kv_end = tl.minimum(hi_pos + 1, seq_len)
        full_end = (tl.minimum(lo_pos + 1, seq_len) // BLOCK_N) * BLOCK_N
        if SPLIT:  # this program covers keys [lo, hi) only (a multiple of BLOCK_N long)
            lo = split * keys_per_split
            hi = tl.minimum(kv_end, lo + keys_per_split)
            band_lo = tl.maximum(full_end, lo)
            full_end = tl.minimum(full_end, hi)
            kv_end = hi
        else:
            lo = 0
            band_lo = full_end
        # Each tile's cache pages are read one iteration ahead. With the page load in
        # the same iteration the K/V loads sit behind another load, and Triton's
        # pipeliner then gave them no lead (3 stages ran slower than 2); with the pages
        # carried in from the previous iteration, 3 stages fetch K/V ahead (+10-12%).
        page_next = _tile_pages(bt_row, lo, seq_len, block_size, BLOCK_N)
        for start in range(lo, full_end, BLOCK_N):
            page = page_next
            page_next = _tile_pages(bt_row, start + BLOCK_N, seq_len, block_size, BLOCK_N)
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, row_pos, k_base, v_base, page, start, seq_len,
                block_size, c_kb, c_ks, c_kd, c_vb, c_vs, c_vd, qk_scale,
                False, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
        # The causal band: keys between the smallest and the largest query position.
        page_next = _tile_pages(bt_row, band_lo, seq_len, block_size, BLOCK_N)
        for start in range(band_lo, kv_end, BLOCK_N):
            page = page_next
            page_next = _tile_pages(bt_row, start + BLOCK_N, seq_len, block_size, BLOCK_N)
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, row_pos, k_base, v_base, page, start, seq_len,
                block_size, c_kb, c_ks, c_kd, c_vb, c_vs, c_vd, qk_scale,
                True, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)

        if SPLIT:  # unnormalized partial state, merged by _merge_splits_kernel
            row_m = split * s_ms + qi64 * s_mt + head * s_mh
            tl.store(part_m + row_m, m_i, mask=row_ok)
            tl.store(part_l + row_m, l_i, mask=row_ok)
            tl.store(part_acc + split * s_as + qi64[:, None] * s_at + head[:, None] * s_ah
                     + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        else:
            out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            tl.store(out_ptr + qi64[:, None] * s_ot + head[:, None] * s_oh + d[None, :] * s_od,
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit(do_not_specialize=["num_splits", "s_as", "s_ms"])
    def _merge_splits_kernel(part_acc, part_m, part_l, out_ptr, num_splits,
                             s_as, s_at, s_ah, s_ms, s_mt, s_mh, s_ot, s_oh, s_od,
                             HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        s_ok = sp < num_splits
        m = tl.load(part_m + sp * s_ms + t * s_mt + h * s_mh, mask=s_ok, other=float("-inf"))
        l_s = tl.load(part_l + sp * s_ms + t * s_mt + h * s_mh, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits
        denom = tl.sum(l_s * w, 0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(part_acc + sp[:, None] * s_as + t * s_at + h * s_ah + d[None, :],
                      mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
        tl.store(out_ptr + t * s_ot + h * s_oh + d * s_od, o.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_inputs(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, q_pos):
    if q.dim() != 3:
        raise ValueError(f"q must be [Nq, Hq, D], got {tuple(q.shape)}")
    Nq, Hq, D = q.shape
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must be 4-D views "
                         "[num_blocks, block_size, Hkv, D] of the same shape; got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    Hkv = key_cache.shape[2]
    if key_cache.shape[3] != D:
        raise ValueError(f"cache head_dim {key_cache.shape[3]} != query head_dim {D}")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if not q.dtype.is_floating_point or key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise ValueError(f"q, key_cache, value_cache must share one float dtype; got "
                         f"{q.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [B, max_blocks], got {tuple(block_table.shape)}")
    B = block_table.shape[0]
    if seq_lens.shape != (B,) or cu_seqlens_q.shape != (B + 1,):
        raise ValueError(f"seq_lens must be [{B}] and cu_seqlens_q [{B + 1}]; got "
                         f"{tuple(seq_lens.shape)} and {tuple(cu_seqlens_q.shape)}")
    if q_pos.shape != (Nq,):
        raise ValueError(f"q_pos must be [{Nq}], got {tuple(q_pos.shape)}")
    for name, x in (("block_table", block_table), ("seq_lens", seq_lens),
                    ("cu_seqlens_q", cu_seqlens_q), ("q_pos", q_pos)):
        if x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    devices = {x.device for x in (q, key_cache, value_cache, block_table, seq_lens,
                                  cu_seqlens_q, q_pos)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _default_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes by head_dim (register/shared-memory budget of one program)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim <= 128:  # best of the configs timed on an H200 at 8K and 32K (KERNEL_NOTES.md)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


# Constexpr sizes kept fixed, so that every call compiles the same kernels (a new value
# would compile again while serving): the sequences one launch may hold (its varlen
# lookup table) and the key splits one merge may fold.
MAX_SEQS = 31
MAX_SPLITS = 64


def _num_splits(programs: int, max_keys: int, block_n: int, n_sm: int) -> int:
    """Key splits per query block so that a small problem still fills the GPU.

    With the longest-first order, two waves of programs already balance well (8K: 312
    programs on 132 SMs, no split); below that, splitting each query block's keys
    (flash-decoding style) multiplies the programs, at the price of one float32 partial
    output per split and a merge launch. Splits stay >= 8 key tiles.
    """
    if programs >= 2 * n_sm:
        return 1
    return max(1, min(-(-4 * n_sm // max(programs, 1)), max_keys // (8 * block_n), MAX_SPLITS))


def partial_attention(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q,
                      q_pos, scale: float, out: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """Attention of queries at arbitrary positions over a paged KV cache (one launch).

    q [Nq, Hq, D]; key_cache/value_cache 4-D views [num_blocks, block_size, Hkv, D];
    block_table [B, max_blocks]; seq_lens [B] keys per sequence; cu_seqlens_q [B+1]
    query row offsets; q_pos [Nq] position of each query within its sequence (sorted
    within a sequence for speed; any order is correct). Mask: key_pos <= q_pos and
    key_pos < seq_len. Returns out [Nq, Hq, D] in q's dtype. No host sync.
    """
    if not HAS_TRITON:
        raise RuntimeError("partial_attention needs triton; use partial_attention_reference")
    _check_inputs(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, q_pos)
    if not (q.is_cuda or _interpreting()):
        raise ValueError("partial_attention runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    Nq, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    B = block_table.shape[0]
    if B > MAX_SEQS:
        raise ValueError(f"at most {MAX_SEQS} sequences per launch, got {B}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError("out must match q in shape, dtype and device")
    if Nq == 0:
        return out
    G = Hq // Hkv
    G_PAD = triton.next_power_of_2(G)
    cfg = dict(_default_config(D, q.dtype), **(config or {}))
    block_m = max(cfg["BLOCK_M"], G_PAD, 16)
    block_q = block_m // G_PAD
    block_n = cfg["BLOCK_N"]
    block_d = max(triton.next_power_of_2(D), 16)
    q_blocks = triton.cdiv(Nq, block_q) + B - 1  # upper bound, known without a sync
    max_keys = block_table.shape[1] * key_cache.shape[1]
    n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    splits = min(cfg.get("splits") or _num_splits(triton.cdiv(Nq, block_q) * Hkv, max_keys,
                                                  block_n, n_sm), MAX_SPLITS)
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), block_n) * block_n
    splits = triton.cdiv(max_keys, keys_per_split)
    if splits > 1:
        part_acc = torch.empty(splits, Nq, Hq, D, dtype=torch.float32, device=q.device)
        part_m = torch.empty(splits, Nq, Hq, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # unused placeholders
        part_acc = part_m = part_l = out
    _partial_attention_kernel[(q_blocks * splits * Hkv,)](
        q, key_cache, value_cache, out, block_table, seq_lens, cu_seqlens_q, q_pos,
        part_acc, part_m, part_l,
        B, Hkv, q_blocks, splits, scale * LOG2E, key_cache.shape[1], keys_per_split,
        *q.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(),
        block_table.stride(0), *part_acc.stride()[:3], *part_m.stride()[:3],
        G=G, G_PAD=G_PAD, HEAD_DIM=D,
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_B=MAX_SEQS + 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SPLIT=splits > 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _merge_splits_kernel[(Nq, Hq)](
            part_acc, part_m, part_l, out, splits,
            *part_acc.stride()[:3], *part_m.stride(), *out.stride(),
            HEAD_DIM=D, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d,
            num_warps=4)
    return out


# --------------------------------------------------------------------------------------
# Torch reference (the CPU engine path)
# --------------------------------------------------------------------------------------
def gather_paged(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) 0..length-1 of one sequence: [length, Hkv, D] from a 4-D view."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    pages = block_row[:n_blocks].long()
    return cache[pages].reshape(n_blocks * block_size, *cache.shape[2:])[:length]


def partial_attention_reference(q, key_cache, value_cache, block_table, seq_lens,
                                cu_seqlens_q, q_pos, scale: float,
                                out: torch.Tensor | None = None,
                                compute_dtype: torch.dtype = torch.float32,
                                max_scores: int = 1 << 26) -> torch.Tensor:
    """Torch equivalent of ``partial_attention``: masked softmax in ``compute_dtype``.

    Loops over sequences and over query slices so that the score tile stays below
    ``max_scores`` elements; no loop over tokens.
    """
    _check_inputs(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, q_pos)
    Nq, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    G = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(block_table.shape[0]):
        lo, hi, n_k = cu[b], cu[b + 1], int(lens[b])
        if hi <= lo:
            continue
        k = gather_paged(key_cache, block_table[b], n_k).to(compute_dtype)  # [Nk, Hkv, D]
        v = gather_paged(value_cache, block_table[b], n_k).to(compute_dtype)
        k = k.repeat_interleave(G, dim=1).transpose(0, 1)  # [Hq, Nk, D]
        v = v.repeat_interleave(G, dim=1).transpose(0, 1)
        key_pos = torch.arange(n_k, device=q.device)
        step = max(1, max_scores // max(1, Hq * n_k))
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            qs = q[s:e].to(compute_dtype).transpose(0, 1)  # [Hq, n, D]
            scores = torch.matmul(qs, k.transpose(1, 2)) * scale  # [Hq, n, Nk]
            visible = key_pos[None, :] <= q_pos[s:e, None].to(key_pos.dtype)  # [n, Nk]
            scores = scores.masked_fill(~visible, float("-inf"))
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
            out[s:e] = torch.matmul(p, v).transpose(0, 1).to(out.dtype)
    return out

"""Torch attention for the passes off the Triton kernels: any query positions over a
dense K/V with the causal mask key_pos <= query_pos.

Who runs it:
- PagedKV.attend and DenseKV.attend (blend/paged.py) where the kernels are off, i.e. on
  CPU without TRITON_INTERPRET=1: the recompute pass, and a chunk computed in isolation.
  On CUDA both go to the Triton partial-attention kernel instead, in place.
- the same PagedKV.attend for CPU_ATTN's packed pages (PackedPagedKV: no strided view for
  a kernel), whatever the platform: the recompute's attention on CPU engines.
- LayerwiseExecutor.score_groups, the scoring pass on a scratch copy of the context's K/V (the
  question's K/V never enter the request's cache), wherever the pipeline cannot score in
  place. On CUDA the pipeline scores in place (blend/pass_graphs.py, kernels only); the
  scratch pass runs there only as the reference tests/gpu checks that pass against.
It is also what the kernels' engine wiring is checked against on CPU
(tests/unit/test_kernels_interpret.py); the kernel's own reference is
partial_attention_reference in csrc_triton/partial_attention.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries attended per SDPA call. Each block attends only to the keys up to its last
# query's position, so small blocks skip most of the masked-out columns (a block of
# late queries still sees the whole context); 64 was fastest on the 2-core CPU (4K
# context, 15% of the queries: 3.7x faster than one block over every key).
_QUERY_BLOCK = 64


def masked_attention(q, k, v, q_pos, k_pos, scale):
    """softmax(q k^T * scale, mask k_pos <= q_pos) v with GQA.

    q [n, Hq, D]; k, v [N, Hkv, D]; returns [n, Hq, D] in q's dtype. Math in float32 on
    CPU (exactness tests compare against a float32 engine); on CUDA in the model's
    dtype, as vLLM's own attention computes. A contiguous causal block (a chunk computed
    in isolation) is one causal SDPA call.
    """
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    if q.is_cuda:
        kt, vt = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)  # [Hkv, N, D]
    else:
        # Head-major copies, once per call: SDPA's CPU kernel then reads each block's keys
        # contiguously (585 queries over 4096 keys, 9/3 heads of 64, one thread: 51 ms
        # against 55 ms on the strided views, 2-core Xeon with AVX512).
        kt, vt = k.float().transpose(0, 1).contiguous(), v.float().transpose(0, 1).contiguous()
    # Sorted, distinct positions: equal and ending at n - 1 means both are 0..n-1 (a
    # chunk computed in isolation): plain causal attention.
    if 0 < n == k.shape[0] and torch.equal(q_pos, k_pos) and int(k_pos[-1]) == n - 1:
        out = F.scaled_dot_product_attention(q.to(kt.dtype).transpose(0, 1)[None], kt[None],
                                             vt[None], is_causal=True, scale=scale,
                                             enable_gqa=group > 1)
        return out[0].transpose(0, 1).to(q.dtype)
    out = torch.empty_like(q)
    sorted_keys = bool((k_pos[1:] >= k_pos[:-1]).all()) if k_pos.numel() > 1 else True
    for s in range(0, n, _QUERY_BLOCK):
        e = min(s + _QUERY_BLOCK, n)
        # Keys visible to some query of the block: positions <= its largest position.
        hi = int(torch.searchsorted(k_pos, q_pos[s:e].max(), right=True)) if sorted_keys else k_pos.numel()
        mask = k_pos[None, :hi] <= q_pos[s:e, None]  # [b, hi]
        qb = q[s:e].to(kt.dtype).transpose(0, 1)  # [Hq, b, D]
        # 4-D with a batch of one: on CPU only that shape takes SDPA's flash kernel
        # (3-D falls back to the math path: 2.3x slower at 4K context, 15% of the
        # queries, 2 cores), and enable_gqa spares the repeat of K/V per query head.
        ob = F.scaled_dot_product_attention(qb[None], kt[None, :, :hi], vt[None, :, :hi],
                                            attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[s:e] = ob[0].transpose(0, 1).to(q.dtype)
    return out

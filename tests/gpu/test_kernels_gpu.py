"""Reuse-path Triton kernels on a CUDA GPU against float32/float64 torch references.

Fresh random inputs per case, outputs poisoned with NaN before each run (an unwritten
element fails), sizes that do not divide the tile sizes, GQA ratios 1/4/8 (and 3),
head_dim 64/80/128/256, bf16 and fp16 (fp32 for the attention too).

Tolerances (relative Frobenius error ||out - ref|| / ||ref||, reference in float32 or
float64 on the same low-precision inputs):
  * load: K is rotated in float32 and rounded once to the cache dtype, exactly as the
    reference does, so K may differ by one rounding at most: 1e-2 (bf16) / 2e-3 (fp16)
    relative, and V must match bit for bit;
  * partial attention: probabilities are rounded to the input dtype before the P.V
    product (as in FlashAttention): 1.5e-2 (bf16), 4e-3 (fp16), 1e-5 (fp32, ieee dots);
  * scoring: float32 accumulation of products of low-precision inputs, no rounding of
    the probabilities: 2e-3 for bf16 and fp16.
"""
from __future__ import annotations

import pytest
import torch

from vllm_kvflow.kernels.attn_norm import attn_norm, attn_norm_reference
from vllm_kvflow.kernels.chunk_load import load_chunk_kv, load_chunk_kv_layers, load_chunk_kv_reference
from vllm_kvflow.kernels.partial_attention import partial_attention, partial_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LOAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATTN_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-5}
SCORE_TOL = {torch.bfloat16: 2e-3, torch.float16: 2e-3}
DEV = "cuda"


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _cache(layout, num_blocks, block_size, heads, head_dim, dtype):
    """Storage and (K, V) 4-D views in vLLM's FLASH_ATTN or CPU_ATTN layout."""
    if layout == "flash":
        kv = torch.randn(num_blocks, block_size, heads, 2 * head_dim, device=DEV).to(dtype)
        return (kv, *kv.split(head_dim, -1))
    kv = torch.randn(num_blocks, heads, 2 * block_size, head_dim, device=DEV).to(dtype)
    return (kv, *(x.permute(0, 2, 1, 3) for x in kv.chunk(2, dim=2)))


def _views(layout, kv, head_dim):
    if layout == "flash":
        return kv.split(head_dim, -1)
    return tuple(x.permute(0, 2, 1, 3) for x in kv.chunk(2, dim=2))


def _cos_sin(max_pos, rotary_dim, dtype=torch.float32):
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=DEV, dtype=torch.float64) / rotary_dim)
    ang = torch.outer(torch.arange(max_pos, device=DEV, dtype=torch.float64), inv)
    return torch.cat([ang.cos(), ang.sin()], -1).to(dtype)


# (head_dim, rotary_dim, is_neox, dtype, layout, block_size)
LOAD_CASES = [
    (64, 64, True, torch.bfloat16, "flash", 16),
    (80, 80, True, torch.float16, "flash", 16),
    (128, 128, True, torch.bfloat16, "cpu", 128),
    (128, 64, False, torch.float16, "flash", 16),
    (256, 64, False, torch.bfloat16, "cpu", 32),
    (256, 256, True, torch.float16, "flash", 16),
    (80, 40, False, torch.bfloat16, "flash", 16),
]


@pytest.mark.parametrize("D,rot,neox,dtype,layout,bs", LOAD_CASES)
def test_load_chunk_kv(D, rot, neox, dtype, layout, bs):
    torch.manual_seed(D + rot)
    T, H = 1001, 8
    nb = (2 * T) // bs + 3
    kv, kc, vc = _cache(layout, nb, bs, H, D, dtype)
    kv.fill_(float("nan"))
    kv_ref = kv.clone()
    kc_ref, vc_ref = _views(layout, kv_ref, D)
    k_src = torch.randn(T, H, D, device=DEV).to(dtype)
    v_src = torch.randn(T, H, D, device=DEV).to(dtype)
    slots = torch.randperm(nb * bs, device=DEV)[:T]
    slots[::97] = -1
    delta = torch.randint(-3000, 3000, (T,), device=DEV)
    cs = _cos_sin(4096, rot, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    load_chunk_kv(k_src, v_src, kc, vc, slots, delta, cs, rot, neox)
    load_chunk_kv_reference(k_src, v_src, kc_ref, vc_ref, slots, delta, cs, rot, neox)
    torch.cuda.synchronize()
    assert torch.equal(kv.isnan(), kv_ref.isnan())  # same elements written
    n_written = 2 * int((slots >= 0).sum()) * H * D
    assert int((~kv.isnan()).sum()) == n_written
    w = ~kc_ref.isnan()
    assert torch.equal(vc[~vc_ref.isnan()], vc_ref[~vc_ref.isnan()])
    assert _rel(kc[w], kc_ref[w]) < LOAD_TOL[dtype]


@pytest.mark.parametrize("layout", ["flash", "cpu"])
def test_load_chunk_kv_all_layers_in_one_launch(layout):
    """Separate per-layer cache allocations reached from the first by element offsets."""
    torch.manual_seed(11)
    L, T, H, D, bs = 4, 777, 8, 128, 16
    nb = T // bs + 3
    dtype = torch.bfloat16
    layers = [_cache(layout, nb, bs, H, D, dtype) for _ in range(L)]
    for kv, _, _ in layers:
        kv.fill_(float("nan"))
    refs = [kv.clone() for kv, _, _ in layers]
    k_src = torch.randn(L, T, H, D, device=DEV).to(dtype)
    v_src = torch.randn(L, T, H, D, device=DEV).to(dtype)
    slots = torch.randperm(nb * bs, device=DEV)[:T]
    delta = torch.randint(-3000, 3000, (T,), device=DEV)
    cs = _cos_sin(4096, D, torch.bfloat16)
    load_chunk_kv_layers(k_src, v_src, [c[1] for c in layers], [c[2] for c in layers],
                         slots, delta, cs, D, True)
    for i, (kv, kc, vc) in enumerate(layers):
        kc_ref, vc_ref = _views(layout, refs[i], D)
        load_chunk_kv_reference(k_src[i], v_src[i], kc_ref, vc_ref, slots, delta, cs, D, True)
        torch.cuda.synchronize()
        assert torch.equal(kv.isnan(), refs[i].isnan())
        w = ~kc_ref.isnan()
        assert torch.equal(vc[~vc_ref.isnan()], vc_ref[~vc_ref.isnan()])
        assert _rel(kc[w], kc_ref[w]) < LOAD_TOL[dtype]


# (Hq, Hkv, D, dtype, layout, block_size, config)
ATTN_CASES = [
    (8, 8, 64, torch.bfloat16, "flash", 16, None),
    (32, 8, 128, torch.bfloat16, "flash", 16, None),
    (32, 4, 128, torch.float16, "cpu", 128, None),
    (16, 2, 80, torch.bfloat16, "flash", 16, None),
    (8, 8, 80, torch.float16, "flash", 16, None),
    (16, 4, 256, torch.bfloat16, "flash", 16, None),
    (8, 1, 256, torch.float16, "cpu", 32, None),
    (12, 4, 64, torch.float16, "flash", 16, None),  # G = 3, padded to 4
    (16, 2, 128, torch.float32, "flash", 16, None),
    (32, 8, 128, torch.bfloat16, "flash", 16, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4)),
    (32, 8, 128, torch.bfloat16, "flash", 16, dict(BLOCK_M=128, BLOCK_N=64, num_stages=3)),
    (32, 8, 128, torch.bfloat16, "flash", 16, dict(splits=1)),  # no key split
    (16, 4, 256, torch.float16, "cpu", 128, dict(splits=5)),  # splits past short sequences
    (32, 8, 128, torch.bfloat16, "flash", 16, dict(num_stages=2)),
    (16, 4, 256, torch.bfloat16, "cpu", 16, dict(BLOCK_N=32, num_stages=3)),
    (32, 8, 128, torch.bfloat16, "flash", 16, dict(splits=3)),  # 3 stages and split keys
]


@pytest.mark.parametrize("Hq,Hkv,D,dtype,layout,bs,config", ATTN_CASES)
def test_partial_attention(Hq, Hkv, D, dtype, layout, bs, config):
    torch.manual_seed(Hq * D)
    lens = [1500, 777, 2049, 5]
    n_sel = [225, 0, 301, 5]  # 15%, none, 15%, all
    max_blocks = max(-(-L // bs) for L in lens)
    nb = sum(-(-L // bs) for L in lens) + 7
    kv, kc, vc = _cache(layout, nb, bs, Hkv, D, dtype)
    perm = torch.randperm(nb, device=DEV)
    block_table = torch.zeros(len(lens), max_blocks, dtype=torch.int32, device=DEV)
    used = 0
    for b, L in enumerate(lens):
        n = -(-L // bs)
        block_table[b, :n] = perm[used:used + n]
        used += n
    q_pos = torch.cat([torch.randperm(L, device=DEV)[:n].sort().values
                       for L, n in zip(lens, n_sel)])
    cu = torch.tensor([0] + torch.tensor(n_sel).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(int(cu[-1]), Hq, D, device=DEV).to(dtype)
    out = torch.full_like(q, float("nan"))
    partial_attention(q, kc, vc, block_table, seq_lens, cu, q_pos, D ** -0.5, out=out,
                      config=config)
    ref = partial_attention_reference(q, kc, vc, block_table, seq_lens, cu, q_pos, D ** -0.5,
                                      out=torch.empty_like(q, dtype=torch.float32))
    assert not out.isnan().any()
    assert _rel(out, ref) < ATTN_TOL[dtype]


def test_partial_attention_clustered_queries():
    """All queries of a tile far apart (wide causal band) and an unsorted order."""
    torch.manual_seed(11)
    Hq, Hkv, D, bs, L = 32, 8, 128, 16, 4000
    kv, kc, vc = _cache("flash", L // bs + 1, bs, Hkv, D, torch.bfloat16)
    block_table = torch.randperm(L // bs + 1, device=DEV)[None].int()
    q_pos = torch.tensor([0, 1, 3999, 2000, 17, 3000, 64, 63], device=DEV)
    q = torch.randn(8, Hq, D, device=DEV, dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    args = (kc, vc, block_table, torch.tensor([L], device=DEV), torch.tensor([0, 8], device=DEV),
            q_pos, 0.09)
    partial_attention(q, *args, out=out)
    ref = partial_attention_reference(q, *args, out=torch.empty_like(q, dtype=torch.float32))
    assert _rel(out, ref) < ATTN_TOL[torch.bfloat16]


def test_partial_attention_in_cuda_graph():
    """The call is capturable (no host sync, no host-to-device copy): capture once, then
    new queries and positions written into the same tensors are picked up on replay."""
    torch.manual_seed(12)
    Hq, Hkv, D, bs, L, nq = 32, 8, 128, 16, 3000, 450
    kv, kc, vc = _cache("flash", L // bs + 2, bs, Hkv, D, torch.bfloat16)
    block_table = torch.randperm(L // bs + 2, device=DEV)[None].int()
    seq_lens = torch.tensor([L], device=DEV, dtype=torch.int32)
    cu = torch.tensor([0, nq], device=DEV, dtype=torch.int32)
    q = torch.randn(nq, Hq, D, device=DEV, dtype=torch.bfloat16)
    q_pos = torch.randperm(L, device=DEV)[:nq].sort().values
    out = torch.empty_like(q)
    args = (q, kc, vc, block_table, seq_lens, cu, q_pos, D ** -0.5)
    partial_attention(*args, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        partial_attention(*args, out=out)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        q_pos.copy_(torch.randperm(L, device=DEV)[:nq].sort().values)
        out.fill_(float("nan"))
        graph.replay()
        ref = partial_attention_reference(*args, out=torch.empty_like(q, dtype=torch.float32))
        assert not out.isnan().any()
        assert _rel(out, ref) < ATTN_TOL[torch.bfloat16]


# (Hq, Hkv, D, dtype, layout, block_size, n_question, n_context)
SCORE_CASES = [
    (8, 8, 64, torch.bfloat16, "flash", 16, 40, 3001),
    (32, 8, 128, torch.bfloat16, "flash", 16, 64, 5000),
    (32, 8, 128, torch.float16, "cpu", 128, 33, 2500),
    (16, 2, 80, torch.float16, "flash", 16, 50, 1999),
    (16, 4, 256, torch.bfloat16, "flash", 16, 21, 2100),
    (8, 1, 256, torch.float16, "cpu", 32, 64, 1000),
    (12, 4, 80, torch.bfloat16, "flash", 16, 17, 777),  # G = 3
]


@pytest.mark.parametrize("Hq,Hkv,D,dtype,layout,bs,nq,nc", SCORE_CASES)
def test_attn_norm(Hq, Hkv, D, dtype, layout, bs, nq, nc):
    torch.manual_seed(nc)
    seq_len = nc + nq
    nb = -(-seq_len // bs)
    kv, kc, _ = _cache(layout, nb + 5, bs, Hkv, D, dtype)
    bt = torch.randperm(nb + 5, device=DEV)[:nb].int()
    q = torch.randn(nq, Hq, D, device=DEV).to(dtype)
    q_pos = torch.arange(nc, seq_len, device=DEV)
    out = torch.full((nc,), float("nan"), device=DEV)
    attn_norm(q, kc, bt, seq_len, q_pos, nc, D ** -0.5, out=out)
    ref = attn_norm_reference(q, kc, bt, seq_len, q_pos, nc, D ** -0.5,
                              compute_dtype=torch.float64)
    assert not out.isnan().any()
    assert _rel(out, ref) < SCORE_TOL[dtype]
    # The selection only needs the order; check the top-15% sets agree closely.
    k = max(1, int(0.15 * nc))
    top = set(out.topk(k).indices.tolist())
    top_ref = set(ref.topk(k).indices.tolist())
    assert len(top & top_ref) >= 0.95 * k

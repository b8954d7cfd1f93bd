"""The torch attention of the CPU recompute path against a float64 softmax."""
import pytest
import torch

from vllm_kvflow.blend import attention
from vllm_kvflow.blend.attention import masked_attention


def reference(q, k, v, q_pos, k_pos, scale):
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)  # [N, Hq, D]
    vv = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    s = s.masked_fill(~(k_pos[None, None, :] <= q_pos[None, :, None]), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)


@pytest.mark.parametrize("keys", ["sorted", "context+question"])
def test_blocked_queries_equal_one_softmax_over_all_keys(keys):
    torch.manual_seed(0)
    N, hq, hkv, D = 300, 6, 2, 32
    if keys == "sorted":
        k_pos = torch.arange(N)
        q_pos = torch.sort(torch.randperm(N)[:150]).values  # > one query block, scattered
    else:  # the scoring pass: context 0..N-21, then the question's own positions
        k_pos = torch.cat([torch.arange(N - 20), torch.arange(N + 5, N + 25)])
        q_pos = torch.arange(N + 5, N + 25)
    q = torch.randn(q_pos.numel(), hq, D)
    k, v = torch.randn(k_pos.numel(), hkv, D), torch.randn(k_pos.numel(), hkv, D)
    out = masked_attention(q, k, v, q_pos, k_pos, 0.17)
    assert attention._QUERY_BLOCK < q_pos.numel() or keys != "sorted"
    torch.testing.assert_close(out.double(), reference(q, k, v, q_pos, k_pos, 0.17),
                               atol=2e-6, rtol=0)  # float32 math


def test_unsorted_keys_still_use_every_key():
    torch.manual_seed(1)
    k_pos = torch.randperm(40)
    q_pos = torch.tensor([5, 17, 39])
    q, k, v = torch.randn(3, 2, 8), torch.randn(40, 2, 8), torch.randn(40, 2, 8)
    torch.testing.assert_close(masked_attention(q, k, v, q_pos, k_pos, 0.3).double(),
                               reference(q, k, v, q_pos, k_pos, 0.3), atol=2e-6, rtol=0)


@pytest.mark.parametrize("hkv", [1, 3, 6])
def test_contiguous_causal_block_equals_reference(hkv):
    """A chunk computed in isolation (positions 0..n-1 on both sides) is one causal
    SDPA call; GQA without repeating K/V."""
    torch.manual_seed(2)
    n, hq, D = 150, 6, 32
    pos = torch.arange(n)
    q, k, v = torch.randn(n, hq, D), torch.randn(n, hkv, D), torch.randn(n, hkv, D)
    torch.testing.assert_close(masked_attention(q, k, v, pos, pos, 0.2).double(),
                               reference(q, k, v, pos, pos, 0.2), atol=2e-6, rtol=0)


def test_empty_queries():
    q, k = torch.randn(0, 4, 8), torch.randn(0, 2, 8)
    empty = torch.zeros(0, dtype=torch.long)
    assert masked_attention(q, k, k, empty, empty, 0.3).shape == (0, 4, 8)

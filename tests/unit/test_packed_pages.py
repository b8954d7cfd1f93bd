"""PackedPagedKV (CPU_ATTN's packed pages) reads back what it wrote, whatever the page
packing: the two orders vLLM's vectorized CPU layouts use are read by a reshape, any
other permutation by a gather; and the write/read pair is exact through a block table
that is neither sorted nor contiguous."""
from __future__ import annotations

import pytest
import torch

from vllm_kvflow.blend.paged import PackedPagedKV, page_order

BLOCK, HEADS, DIM, LAYERS = 8, 2, 4, 2


def _index(order: str) -> torch.Tensor:
    flat = torch.arange(BLOCK * DIM)
    if order == "rows":
        return flat.view(BLOCK, DIM)
    if order == "columns":
        return flat.view(DIM, BLOCK).t()
    return torch.randperm(BLOCK * DIM, generator=torch.Generator().manual_seed(1)).view(BLOCK, DIM)


@pytest.mark.parametrize("key_order,value_order", [("columns", "rows"), ("rows", "columns"),
                                                   ("other", "other")])
def test_read_returns_what_was_written(key_order, value_order):
    kv = PackedPagedKV(keys=[torch.zeros(6, HEADS, BLOCK * DIM) for _ in range(LAYERS)],
                       values=[torch.zeros(6, HEADS, BLOCK * DIM) for _ in range(LAYERS)],
                       block_ids=torch.tensor([4, 1, 5]), block_size=BLOCK,
                       key_index=_index(key_order), value_index=_index(value_order))
    kv.key_order, kv.value_order = page_order(kv.key_index), page_order(kv.value_index)
    assert kv.key_order == (None if key_order == "other" else key_order)
    length = 2 * BLOCK + 3
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(length, HEADS, DIM, generator=gen)
    values = torch.randn(length, HEADS, DIM, generator=gen)
    kv.write(1, torch.arange(length), keys, values)
    for n in (length, BLOCK, 5):
        got_k, got_v = kv.read(1, n)
        assert got_k.shape == (n, HEADS, DIM)
        assert torch.equal(got_k, keys[:n]) and torch.equal(got_v, values[:n])
    # The packing is not a no-op: the page element at (offset 1, dim 0) of a
    # dim-major page is the key's second dim-0 entry, not its row 0 dim 1.
    if key_order == "columns":
        assert kv.keys[1][4, 0, 1] == keys[1, 0, 0]

"""Where CPU_ATTN keeps each key/value element inside a (block, head) page.

vLLM's CPU attention kernels pack the key rows of a page in an ISA-specific order
(vectorized "vec"/"vec16", AMX tiles, NEON, ...), written by the custom op
`cpu_attn_reshape_and_cache`. Rather than hard-code any packing, we write probe values
through vLLM's own op once per (isa, dtype, block_size, head_dim) and read back which
page element holds which (token offset, dim). The result is a permutation, checked to
be a bijection, so reads and writes through it are exact.
"""
from __future__ import annotations

import functools

import torch


def _probe(isa: str, dtype: torch.dtype, block_size: int, head_dim: int, encode_dim: bool):
    from vllm import _custom_ops as ops

    pages = torch.full((1, 1, 2 * block_size, head_dim), -1.0, dtype=dtype)
    key_cache, value_cache = pages.chunk(2, dim=2)
    offs = torch.arange(block_size, dtype=torch.float32)[:, None].expand(block_size, head_dim)
    dims = torch.arange(head_dim, dtype=torch.float32)[None, :].expand(block_size, head_dim)
    probe = (dims if encode_dim else offs).to(dtype).reshape(block_size, 1, head_dim).contiguous()
    slots = torch.arange(block_size, dtype=torch.long)
    ops.cpu_attn_reshape_and_cache(probe, probe.clone(), key_cache, value_cache, slots, isa)
    return key_cache.reshape(-1).float(), value_cache.reshape(-1).float()


@functools.lru_cache(maxsize=None)
def page_permutation(isa: str, dtype: torch.dtype, block_size: int, head_dim: int):
    """(key_index, value_index): LongTensor [block_size * head_dim] each, such that the
    page's flat element key_index[o * head_dim + d] holds K[offset o, dim d]."""
    # Values up to 255 are exact in bf16/fp16, so offsets and dims are probed separately.
    if max(block_size, head_dim) > 256:
        raise NotImplementedError("layout probe supports block_size and head_dim <= 256")
    k_off, v_off = _probe(isa, dtype, block_size, head_dim, encode_dim=False)
    k_dim, v_dim = _probe(isa, dtype, block_size, head_dim, encode_dim=True)
    out = []
    for off, dim in ((k_off, k_dim), (v_off, v_dim)):
        logical = off.long() * head_dim + dim.long()  # what each page element holds
        index = torch.full((block_size * head_dim,), -1, dtype=torch.long)
        index[logical] = torch.arange(logical.numel())
        if (off < 0).any() or (dim < 0).any() or (index < 0).any():
            raise RuntimeError(f"CPU_ATTN page layout for isa={isa} is not a permutation")
        out.append(index)
    return out[0], out[1]


def cpu_op_caches(kv_cache: torch.Tensor):
    """The (key_cache, value_cache) arguments vLLM's CPU cache-write op takes."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    pages = kv_cache.view(num_blocks, num_heads, 2 * block_size, two_d // 2)
    return pages.chunk(2, dim=2)


def cpu_cache_writer(isa: str):
    """write(key [n, H, D], value, key_cache, value_cache, slot_mapping) through vLLM's op."""
    from vllm import _custom_ops as ops

    def write(key, value, key_cache, value_cache, slot_mapping):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)

    return write

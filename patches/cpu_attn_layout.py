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


def cpu_paged_attention(isa: str):
    """attend(q, key_cache, value_cache, block_row, positions, scale) -> out: queries at
    sorted, distinct positions of one sequence over its paged CPU_ATTN cache, mask
    key_pos <= query_pos, by vLLM's own CPU attention kernel (no gather of the context).

    That kernel serves causal prefill: each sequence's queries are its last tokens. So
    the positions are cut into runs of consecutive positions, and each run is one
    "sequence" ending at its last position, over the same block table."""
    from vllm import _custom_ops as ops

    def attend(q, key_cache, value_cache, block_row, positions, scale):
        n, num_heads, head_dim = q.shape
        pos = positions.to(torch.int64)
        breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        starts = torch.cat([breaks.new_zeros(1), breaks])
        ends = torch.cat([breaks, breaks.new_full((1,), n)])
        query_start_loc = torch.cat([starts, ends[-1:]]).to(torch.int32)
        seq_lens = (pos[ends - 1] + 1).to(torch.int32)
        runs = starts.numel()
        block_table = block_row.to(torch.int32)[None].expand(runs, -1).contiguous()
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=runs, num_heads=num_heads, num_kv_heads=key_cache.shape[1],
            head_dim=head_dim, seq_lens=seq_lens, dtype=q.dtype, query_start_loc=query_start_loc,
            causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=metadata, s_aux=None)
        return out

    return attend

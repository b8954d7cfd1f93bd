"""Access to one request's KV in vLLM's paged cache, whatever the backend's layout.

PagedKV serves strided layouts (FLASH_ATTN) through 4-D views [num_blocks, block_size,
num_kv_heads, head_dim], which the Triton kernels take with their strides; PackedPagedKV
serves CPU_ATTN's packed pages through a probed permutation. Both offer the same
write / read / attend / load_rotated, so the pipeline never assumes a layout. DenseKV is
a private contiguous buffer with the same write / read / attend, for computing a chunk in
isolation.

`attend` is where the device matters: on CUDA the paged views go straight to the Triton
partial-prefill kernel (no gather of the context); elsewhere the KV is gathered and the
torch reference (`masked_attention`) runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vllm_kvflow.blend.attention import masked_attention
from vllm_kvflow.blend.host_ints import device_ints


def packed_pages(kv_cache: torch.Tensor, head_dim: int):
    """CPU_ATTN: (key pages, value pages), each [num_blocks, H, block_size * head_dim]."""
    num_blocks, num_heads, block_size, _ = kv_cache.shape
    pages = kv_cache.view(num_blocks, num_heads, 2 * block_size * head_dim)
    return pages[..., : block_size * head_dim], pages[..., block_size * head_dim:]


def split_kv_cache(kv_cache: torch.Tensor, layout: str, head_dim: int):
    """(key_view, value_view), each [num_blocks, block_size, num_kv_heads, head_dim].

    layout "flash": FLASH_ATTN, logical [B, H, N, 2D] whose strides are those of
        [B, N, H, 2D]: K and V interleaved on the last dim of each token row.
    layout "stacked": a [2, B, N, H, D] tensor (older flash layout).
    CPU_ATTN packs its pages in an ISA-specific order that no strided view can express:
    use packed_pages() and PackedPagedKV for it.
    """
    if layout == "stacked":
        return kv_cache[0], kv_cache[1]
    if layout != "flash":
        raise ValueError(f"no strided view for layout {layout!r} (CPU_ATTN: use packed_pages)")
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_dim:
        raise ValueError(f"unexpected KV cache shape {tuple(kv_cache.shape)} for {layout}")
    return kv_cache.transpose(1, 2).split(head_dim, dim=-1)


def layout_for_backend(backend_name: str, kv_cache: torch.Tensor) -> str:
    name = backend_name.upper()
    if name.startswith("CPU"):
        return "cpu"
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return "stacked"
    if "FLASH" in name and "INFER" not in name:
        return "flash"
    raise NotImplementedError(
        f"kvflow does not know the KV layout of attention backend {backend_name}"
    )


def use_kernels(t: torch.Tensor) -> bool:
    """The Triton kernels on CUDA, and under TRITON_INTERPRET=1 (how CI checks this wiring
    on CPU); the torch path otherwise."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class _PassIndex:
    """Per-pass index tensors of PagedKV (see PagedKV._pass_index)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor,
                 table: torch.Tensor | None = None):
        dev = positions.device
        self.positions = positions
        self.slots = slots
        self.table = table  # block table, where the holder does not have its own
        self.positions_i32 = positions.to(torch.int32)
        self.cu_seqlens_q = device_ints([0, positions.numel()], dev, np.int32)
        self._seq_lens: dict[int, torch.Tensor] = {}

    @staticmethod
    def of(holder, positions: torch.Tensor, make) -> "_PassIndex":
        """holder's index for this pass: built by make() once, then reused by every layer
        (the executor hands each layer the same positions tensor, so identity is the key)."""
        memo = holder.__dict__.get("_memo")
        if memo is None or memo.positions is not positions:
            memo = holder.__dict__["_memo"] = make()
        return memo

    def seq_lens(self, length: int) -> torch.Tensor:
        if length not in self._seq_lens:
            self._seq_lens[length] = torch.full((1,), length, dtype=torch.int32,
                                                device=self.positions.device)
        return self._seq_lens[length]


@dataclass
class PagedKV:
    """One request's KV across layers: block table over per-layer paged views."""

    keys: list[torch.Tensor]  # per layer [num_blocks, block_size, H, D]
    values: list[torch.Tensor]
    block_ids: torch.Tensor  # int64 [num_request_blocks]
    block_size: int
    strided = True  # keys/values are views the Triton kernels can read in place

    @property
    def block_table(self) -> torch.Tensor:
        """[1, num_request_blocks] int32, the kernels' block-table form (built once)."""
        table = self.__dict__.get("_block_table")
        if table is None:
            table = self.__dict__["_block_table"] = self.block_ids.to(torch.int32)[None]
        return table

    def slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of each position."""
        pos = positions.to(torch.long)
        return self.block_ids[pos // self.block_size], pos % self.block_size

    def slot_mapping(self, positions: torch.Tensor) -> torch.Tensor:
        block, offset = self.slots(positions)
        return block * self.block_size + offset

    def _pass_index(self, positions: torch.Tensor) -> "_PassIndex":
        """Index tensors of one layer-wise pass, built once (rebuilding them per layer
        costs launches and host-to-device syncs)."""
        return _PassIndex.of(self, positions, lambda: _PassIndex(positions, self.slot_mapping(positions)))

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        slots = self._pass_index(positions).slots
        for cache, x in ((self.keys[layer], k), (self.values[layer], v)):
            try:  # [num_blocks, block_size] merge into one slot axis in strided layouts
                flat = cache.view(-1, *cache.shape[2:])
            except RuntimeError:
                block, offset = self.slots(positions)
                cache[block, offset] = x.to(cache.dtype)
                continue
            flat.index_copy_(0, slots, x.to(cache.dtype))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, length): [length, H, D] each."""
        nblocks = -(-length // self.block_size)
        blocks = self.block_ids[:nblocks]
        k = self.keys[layer][blocks].flatten(0, 1)[:length]
        v = self.values[layer][blocks].flatten(0, 1)[:length]
        return k, v

    def attend(self, layer: int, q: torch.Tensor, positions: torch.Tensor, length: int,
               scale: float) -> torch.Tensor:
        """Attention of q [n, Hq, D] at `positions` over this request's KV [0, length):
        the Triton kernel in place where the pages have a strided view, else torch
        attention over the KV read out."""
        if not (self.strided and use_kernels(q)):
            k, v = self.read(layer, length)
            return masked_attention(q, k, v, positions, torch.arange(length, device=q.device), scale)
        from vllm_kvflow.kernels.partial_attention import partial_attention

        idx = self._pass_index(positions)
        return partial_attention(q, self.keys[layer], self.values[layer], self.block_table,
                                 idx.seq_lens(length), idx.cu_seqlens_q, idx.positions_i32, scale)

    def load_rotated(self, layer: int, positions, k_src, v_src, delta, cos_sin, rotary_dim,
                     is_neox) -> None:
        """Write a chunk's K (rotated by delta) and V at positions, in one fused pass."""
        from vllm_kvflow.kernels import chunk_load

        fused = chunk_load.load_chunk_kv if use_kernels(k_src) else chunk_load.load_chunk_kv_reference
        fused(k_src, v_src, self.keys[layer], self.values[layer], self.slot_mapping(positions),
              delta, cos_sin, rotary_dim, is_neox)

    def _offsets(self):
        """Per-layer cache offsets for one-launch loads (built once), or None where the
        layers' caches cannot be reached from the first one's."""
        if "_layer_offsets" not in self.__dict__:
            from vllm_kvflow.kernels import chunk_load

            try:
                self.__dict__["_layer_offsets"] = (chunk_load.layer_offsets(self.keys),
                                                   chunk_load.layer_offsets(self.values))
            except ValueError:
                self.__dict__["_layer_offsets"] = None
        return self.__dict__["_layer_offsets"]

    def load_rotated_layers(self, layers: range, positions, k_src, v_src, delta, cos_sin,
                            rotary_dim, is_neox) -> None:
        """load_rotated for consecutive layers, k_src/v_src [len(layers), T, H, D]: one
        kernel launch for all of them on the kernel path."""
        offsets = self._offsets() if self.strided and use_kernels(k_src) else None
        if offsets is None:
            for i, layer in enumerate(layers):
                self.load_rotated(layer, positions, k_src[i], v_src[i], delta, cos_sin,
                                  rotary_dim, is_neox)
            return
        from vllm_kvflow.kernels import chunk_load

        l0, l1 = layers.start, layers.stop
        k_off, v_off = (o[l0:l1] - o[l0] for o in offsets)  # relative to layer l0's view
        chunk_load.load_chunk_kv_layers(
            k_src, v_src, self.keys[l0:l1], self.values[l0:l1], self.slot_mapping(positions),
            delta, cos_sin, rotary_dim, is_neox, offsets=(k_off, v_off))

    def load_rotated_segments(self, segments, positions, delta, cos_sin, rotary_dim,
                              is_neox) -> None:
        """load_rotated for every layer from many chunks' own tensors, read in place (no
        gathered copy): segments are (keys, values, first, count), see
        chunk_load.load_chunk_kv_segments. ValueError where this cache or the sources
        do not allow it; the caller then gathers and uses load_rotated_layers."""
        offsets = self._offsets() if self.strided and use_kernels(positions) else None
        if offsets is None:
            raise ValueError("segment loads need the kernel path and layer offsets")
        from vllm_kvflow.kernels import chunk_load

        chunk_load.load_chunk_kv_segments(
            segments, self.keys, self.values, self.slot_mapping(positions), delta, cos_sin,
            rotary_dim, is_neox, offsets=offsets)


@dataclass
class PackedPagedKV(PagedKV):
    """A paged cache whose pages hold each head's key rows and value rows in a packed
    order (CPU_ATTN): `keys`/`values` are [num_blocks, H, block_size * D] flat pages and
    key_index/value_index map logical (offset, dim) to page elements.

    Attention (PagedKV.attend, no strided view) is torch attention over the pages read
    out. vLLM's own CPU attention kernel serves only queries that end their sequence, so
    scattered positions would be one sequence per run, each reading the whole context
    with one query row. On a 2-core AVX2 machine, float32, 585 scattered queries over
    4096 keys took 117 ms per layer there against 60 ms in SDPA's 64-query blocks, and
    infoflow's 4K TTFT (eager engine) fell from 3.9 s to 2.8 s."""

    strided = False
    key_index: torch.Tensor | None = None  # [block_size, D]
    value_index: torch.Tensor | None = None
    # page_order of each index, worked out once by whoever builds the views (None: any
    # other packing, read through the index).
    key_order: str | None = None
    value_order: str | None = None
    # vLLM's own cache-write op and its per-layer (key_cache, value_cache) arguments:
    # faster than our scatter, and packs exactly as the attention kernel reads.
    write_op: object | None = None
    op_caches: list | None = None

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.write_op is not None:
            key_cache, value_cache = self.op_caches[layer]
            dtype = key_cache.dtype
            self.write_op(k.to(dtype).contiguous(), v.to(dtype).contiguous(), key_cache, value_cache,
                          self.slot_mapping(positions))
            return
        block, offset = self.slots(positions)
        heads = torch.arange(k.shape[1], device=k.device)[None, :, None]
        b = block[:, None, None]
        self.keys[layer][b, heads, self.key_index[offset][:, None, :]] = k.to(self.keys[layer].dtype)
        self.values[layer][b, heads, self.value_index[offset][:, None, :]] = v.to(self.values[layer].dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, length): [length, H, D] each, as views of per-head
        [H, n, D] copies (the layout attention wants: one copy, no transpose after)."""
        nblocks = -(-length // self.block_size)
        blocks = self.block_ids[:nblocks]
        return (_unpack(self.keys[layer][blocks], self.key_index, self.key_order, length),
                _unpack(self.values[layer][blocks], self.value_index, self.value_order, length))

    def load_rotated(self, layer, positions, k_src, v_src, delta, cos_sin, rotary_dim, is_neox):
        from vllm_kvflow.kernels.chunk_load import rotate_keys_reference

        k = rotate_keys_reference(k_src, delta, cos_sin, rotary_dim, is_neox)
        self.write(layer, positions, k, v_src)

    def load_rotated_segments(self, segments, positions, delta, cos_sin, rotary_dim,
                              is_neox) -> None:
        """Every layer of many chunks, each (keys, values, first, count) [L, T, H, D]: a
        segment moves by one distance, so its rotation is one (cos, sin) pair for all
        its tokens and layers, applied straight into a buffer of all layers; then one
        write per layer through vLLM's op."""
        from vllm_kvflow.kernels.chunk_load import rotate_segment_reference

        if self.write_op is None:
            raise ValueError("segment loads need vLLM's cache-write op")
        n = positions.numel()
        first_keys = segments[0][0]
        num_layers, _, heads, head_dim = first_keys.shape
        dtype = self.op_caches[0][0].dtype
        k_all = torch.empty(num_layers, n, heads, head_dim, dtype=dtype)
        v_all = torch.empty_like(k_all)
        t = 0
        for keys, values, first, count in segments:
            rotate_segment_reference(keys[:, first:first + count], int(delta[t]), cos_sin,
                                     rotary_dim, is_neox, out=k_all[:, t:t + count])
            v_all[:, t:t + count] = values[:, first:first + count]
            t += count
        slots = self.slot_mapping(positions)
        for layer in range(num_layers):
            key_cache, value_cache = self.op_caches[layer]
            self.write_op(k_all[layer], v_all[layer], key_cache, value_cache, slots)


def page_order(index: torch.Tensor) -> str | None:
    """How a packed page orders one head's [block_size, D] rows, from its index
    (index[o, d] = the page element holding row o, dim d): "rows" (row-major, as
    written), "columns" (transposed: dim-major), or None (any other packing)."""
    block_size, head_dim = index.shape
    flat = torch.arange(block_size * head_dim, dtype=index.dtype)
    if torch.equal(index, flat.view(block_size, head_dim)):
        return "rows"
    if torch.equal(index, flat.view(head_dim, block_size).t()):
        return "columns"
    return None


def _unpack(pages: torch.Tensor, index: torch.Tensor, order: str | None, length: int) -> torch.Tensor:
    """Packed pages [nb, H, block_size * D] -> their first `length` rows, [length, H, D],
    as a view of one per-head [H, nb * block_size, D] copy. vLLM's vectorized CPU
    layouts keep values row-major and keys dim-major: both are a reshape, not a gather."""
    nb, heads, _ = pages.shape
    block_size, head_dim = index.shape
    if order == "rows":
        per_head = pages.view(nb, heads, block_size, head_dim).transpose(0, 1)
    elif order == "columns":
        per_head = pages.view(nb, heads, head_dim, block_size).permute(1, 0, 3, 2)
    else:
        per_head = pages[:, :, index.flatten()].view(nb, heads, block_size, head_dim).transpose(0, 1)
    return per_head.reshape(heads, nb * block_size, head_dim)[:, :length].transpose(0, 1)


@dataclass
class DenseKV:
    """A private contiguous KV buffer, for computing a chunk in isolation."""

    keys: torch.Tensor  # [num_layers, capacity, H, D]
    values: torch.Tensor
    # Where keys/values are slices of a buffer shared with other computes
    # (blend/dense_batch.py): that buffer's (keys, values) and the slice's first row.
    arena: tuple[torch.Tensor, torch.Tensor] | None = None
    offset: int = 0

    @classmethod
    def empty(cls, num_layers, capacity, num_heads, head_dim, dtype, device):
        shape = (num_layers, capacity, num_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device))

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer, positions] = k.to(self.keys.dtype)
        self.values[layer, positions] = v.to(self.values.dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer, :length], self.values[layer, :length]

    def copy_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows [start, stop), every layer: contiguous copies."""
        return (self.keys[:, start:stop].clone(memory_format=torch.contiguous_format),
                self.values[:, start:stop].clone(memory_format=torch.contiguous_format))

    def release(self) -> None:
        """Nothing to hand back: the buffer goes with its last reference."""

    def attend(self, layer: int, q: torch.Tensor, positions: torch.Tensor, length: int,
               scale: float) -> torch.Tensor:
        if not use_kernels(q):
            k, v = self.read(layer, length)
            return masked_attention(q, k, v, positions, torch.arange(length, device=q.device), scale)
        from vllm_kvflow.kernels.partial_attention import partial_attention

        # The buffer is one page: [1, capacity, H, D] with block table [[0]].
        memo = _PassIndex.of(self, positions, lambda: _PassIndex(
            positions, positions, table=torch.zeros(1, 1, dtype=torch.int32, device=q.device)))
        return partial_attention(q, self.keys[layer][None], self.values[layer][None], memo.table,
                                 memo.seq_lens(length), memo.cu_seqlens_q, memo.positions_i32, scale)

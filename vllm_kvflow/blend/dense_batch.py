"""Isolated computes that share one buffer, so that a pass attends for all of them at once.

A burst of store misses starts tens of isolated computes in one engine step, each with
its private KV buffer (DenseKV). Per layer, each then cost its own K/V write and its own
attention launch: on an H200 with an 8B model, two passes over ~17 chunks each spent
0.31 s of host time in those 2 x 32 x 17 writes and launches, the GPU mostly waiting.
Here the computes that start together get their buffers as slices of one arena, and a
pass writes all their K/V with one index_copy_ per layer and attends with one
partial-attention launch per MAX_SEQS of them (the kernel is varlen over sequences; the
arena is its paged cache, each slice a run of whole pages, so one block table row per
compute). Only on the kernel path: elsewhere attention is per group anyway, and each
compute keeps a private buffer (BlendPipeline.start_isolated).

An arena is freed when its last compute is done (each slice is a view of it, and a
finished compute's entry is a copy), so a compute spread over several steps keeps its
companions' rows allocated until it ends.

`dense_kv_many` allocates; `attention_plan` turns a pass's row groups into the units the
executor calls per layer: one `SharedBatch` per run of consecutive groups in one arena
(on the kernel path), one `OwnBuffer` per other group (the target's own write/attend).
"""
from __future__ import annotations

import numpy as np
import torch

from vllm_kvflow.blend.host_ints import device_ints
from vllm_kvflow.blend.paged import DenseKV, use_kernels

PAGE = 16  # arena rows per page as the kernel sees them; each slice starts on a page
NO_SPLITS = {"splits": 1}


def dense_kv_many(num_layers: int, capacities: list[int], num_heads: int, head_dim: int,
                  dtype, device) -> list[DenseKV]:
    """One DenseKV per capacity, each a page-aligned slice of one shared arena."""
    offsets, total = [], 0
    for cap in capacities:
        offsets.append(total)
        total += -(-cap // PAGE) * PAGE
    shape = (num_layers, total, num_heads, head_dim)
    keys = torch.empty(shape, dtype=dtype, device=device)
    values = torch.empty(shape, dtype=dtype, device=device)
    return [DenseKV(keys[:, o:o + cap], values[:, o:o + cap], arena=(keys, values), offset=o)
            for o, cap in zip(offsets, capacities)]


class OwnBuffer:
    """One group through its own target's write and attend."""

    def __init__(self, group, rows: tuple[int, int]):
        self.group, self.rows = group, rows

    def __call__(self, layer: int, q, k, v, out, scale: float) -> None:
        a, b = self.rows
        g = self.group
        g.kv.write(layer, g.positions, k[a:b], v[a:b])
        out[a:b] = g.kv.attend(layer, q[a:b], g.positions, g.length, scale)


class SharedBatch:
    """Consecutive groups whose targets are slices of one arena: per layer, one write
    for all of them and one attention launch per MAX_SEQS groups."""

    def __init__(self, groups: list, bounds: list[tuple[int, int]]):
        from vllm_kvflow.kernels.partial_attention import MAX_SEQS

        self.keys, self.values = groups[0].kv.arena
        device = groups[0].positions.device
        self.rows = (bounds[0][0], bounds[-1][1])
        self.slots = torch.cat([g.positions + g.kv.offset for g in groups])
        self.launches = []
        for i in range(0, len(groups), MAX_SEQS):
            part, rows = groups[i:i + MAX_SEQS], bounds[i:i + MAX_SEQS]
            pages = max(-(-g.length // PAGE) for g in part)
            # Page j of a slice; past a slice's own pages, page 0 (masked by its length).
            table = [[g.kv.offset // PAGE + j if j * PAGE < g.length else 0 for j in range(pages)]
                     for g in part]
            first = rows[0][0]
            self.launches.append((
                (first, rows[-1][1]),
                device_ints(table, device, np.int32),
                device_ints([g.length for g in part], device, np.int32),
                device_ints([a - first for a, _ in rows] + [rows[-1][1] - first], device, np.int32),
                torch.cat([g.positions for g in part]).to(torch.int32),
            ))

    def __call__(self, layer: int, q, k, v, out, scale: float) -> None:
        from vllm_kvflow.kernels.partial_attention import partial_attention

        a, b = self.rows
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(0, self.slots, k[a:b].to(keys.dtype))
        values.index_copy_(0, self.slots, v[a:b].to(values.dtype))
        paged_k = keys.view(-1, PAGE, *keys.shape[1:])
        paged_v = values.view(-1, PAGE, *values.shape[1:])
        for (r0, r1), table, seq_lens, cu_seqlens_q, q_pos in self.launches:
            # No key splits: one kernel specialization, which the engine's warm-up
            # compiles; a pass of isolated computes has its rows to fill the GPU with.
            partial_attention(q[r0:r1], paged_k, paged_v, table, seq_lens, cu_seqlens_q,
                              q_pos, scale, out=out[r0:r1], config=NO_SPLITS)


def _arena_of(group):
    arena = getattr(group.kv, "arena", None)
    return None if arena is None else arena[0]


def attention_plan(groups: list, bounds: list[tuple[int, int]]) -> list:
    """The pass's attention units, in row order: on the kernel path, each run of
    consecutive groups in one arena batched (a lone one too: every isolated compute
    then meets the same kernel specialization); every other group on its own."""
    batched = bool(groups) and use_kernels(groups[0].positions)
    plan, i = [], 0
    while i < len(groups):
        arena, j = _arena_of(groups[i]), i + 1
        if not batched or arena is None:
            plan.append(OwnBuffer(groups[i], bounds[i]))
        else:
            while j < len(groups) and _arena_of(groups[j]) is arena:
                j += 1
            plan.append(SharedBatch(groups[i:j], bounds[i:j]))
        i = j
    return plan


def arena_order(items: list, kv_of) -> list:
    """items reordered so that those whose buffers share an arena are consecutive, in
    order of first appearance (order within a pass does not matter: each group attends
    only to itself)."""
    runs: dict = {}
    for n, item in enumerate(items):
        arena = getattr(kv_of(item), "arena", None)
        runs.setdefault(id(arena[0]) if arena is not None else ("own", n), []).append(item)
    return [item for run in runs.values() for item in run]

"""Isolated computes on a static paged arena, so that their passes replay CUDA graphs.

Under a burst of store misses nearly every engine step carries an isolated pass. Run
eagerly, it costs about 1.1 ms of host time per decoder layer on an H200 with an 8B model
(32-44 ms per step: README, "Under load"), and vLLM cannot queue the step's forward until
it is over, so a small request waits for it. The scoring and recompute passes already
replay CUDA graphs over vLLM's paged cache (pass_graphs.py). An isolated compute is the
same pass over a cache of its own: the rows of [sink][tokens] at positions 0.., each
attending to the keys at or before its own position. So this module gives the isolated
computes one paged cache, allocated once at engine start, and runs their passes through a
PassGraphs over it: up to RECOMPUTE_BATCH computes per pass, whose row buckets are
captured at engine start, like the recompute's.

- The arena is [num_layers, pages, PAGE, kv_heads, head_dim] for keys and for values;
  each compute takes whole pages from a free list (its block table), scattered or not.
- Page 0 is the null page: the graphs' padding rows write there, and it is never handed
  out.
- A compute that does not fit (the arena is full, or the compute is longer than it) gets
  a buffer of its own and the eager batched pass of dense_batch.py, as before.
- A compute's pages go back to the free list once its entry is copied out (`release`), or
  when a dropped compute is collected. Work queued later on the stream may then reuse
  them: it runs after the copy, in stream order.
- No graph is captured while serving: a pass of a row bucket beyond those captured at
  start (a lone request's misses, computed whole) runs eagerly on the same buffers.
- On by default on the kernel path; KVFLOW_ISOLATED_ARENA=0 turns it off (enabled()).
  Measured on an H200 (README, "Under load"): the connector's host time per step with
  blend work fell from 35 to 2.5 ms (p50) during a burst of misses.
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from vllm_kvflow.blend.host_ints import device_ints
from vllm_kvflow.blend.pass_graphs import PREFILL_ROWS, RECOMPUTE_BATCH, PassGraphs, PrefillItem

PAGE = 16  # rows per arena page
MAX_ARENA_ROWS = 8192  # 1 GiB of K/V for an 8B model (Llama-3.1-8B in 16 bits)


def enabled() -> bool:
    """The arena is on unless KVFLOW_ISOLATED_ARENA=0 (for A/B runs: the eager path,
    isolated computes in buffers of their own, dense_batch.py)."""
    return os.environ.get("KVFLOW_ISOLATED_ARENA", "1") not in ("0", "")


def arena_rows(step_rows: int) -> int:
    """The arena's rows for a step's isolated budget: four steps' worth (a compute takes
    all its pages when it starts, and one started in a step may run on through later
    ones), at least one largest pass, at most MAX_ARENA_ROWS."""
    return min(MAX_ARENA_ROWS, max(PREFILL_ROWS[1], 4 * step_rows))


class ArenaKV:
    """One isolated compute's pages of the arena (its KV target while it runs)."""

    def __init__(self, arena: "IsolatedArena", pages: list[int]):
        # Not named `arena`: dense_batch reads that name as a shared buffer's tensors.
        self.owner, self.pages = arena, pages
        self.block_ids = device_ints(pages, arena.device)
        # The pages return to the free list once, whichever comes first: release() or
        # this object's collection (a compute dropped with its last waiting request).
        self._release = weakref.finalize(self, arena.free, pages)

    def copy_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows [start, stop), every layer: [num_layers, n, H, D] copies."""
        slots = (np.asarray(self.pages)[:, None] * PAGE + np.arange(PAGE)).ravel()[start:stop]
        index = device_ints(slots, self.owner.device)
        return (self.owner.flat_keys.index_select(1, index),
                self.owner.flat_values.index_select(1, index))

    def release(self) -> None:
        self._release()


class IsolatedArena:
    """Per worker: the arena, its free pages, and the pass graphs over it."""

    def __init__(self, executor, num_layers: int, rows: int, num_kv_heads: int, head_dim: int,
                 dtype, device, capture: bool, pool_of: PassGraphs | None = None):
        """An arena of `rows` rows; pool_of: the graphs whose memory pool the arena's
        graphs share (the recompute's: no two passes run at the same time)."""
        pages = 1 + -(-rows // PAGE)  # + the null page
        shape = (num_layers, pages, PAGE, num_kv_heads, head_dim)
        self.device = torch.device(device)
        # Zeros: pages are handed out again without clearing, and the kernels read an
        # unwritten slot only masked; zeros keep every slot finite all the same.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.flat_keys = self.keys.view(num_layers, pages * PAGE, num_kv_heads, head_dim)
        self.flat_values = self.values.view(num_layers, pages * PAGE, num_kv_heads, head_dim)
        self._free = list(range(pages - 1, 0, -1))  # pop() hands out low pages first
        self.graphs = PassGraphs(executor, list(self.keys), list(self.values), PAGE, [],
                                 capture=capture, max_context=(pages - 1) * PAGE,
                                 capture_while_serving=False, pool_of=pool_of)

    @property
    def free_rows(self) -> int:
        return len(self._free) * PAGE

    def allocate(self, capacity: int) -> ArenaKV | None:
        """Pages for a compute of `capacity` rows; None where they are not free."""
        need = -(-capacity // PAGE)
        if need > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(need)]
        return ArenaKV(self, pages)

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def capture(self, max_rows: int) -> int:
        """At engine start: the graphs of every row bucket up to max_rows (a step's
        isolated budget); how many were captured."""
        return self.graphs.capture_recompute(max_rows)

    def advance(self, pieces: list[tuple[ArenaKV, torch.Tensor, int]]) -> None:
        """Compute each piece (its compute's target, the rows' token ids on the device,
        its first position), in as few passes as RECOMPUTE_BATCH and the largest row
        bucket allow. A piece longer than that bucket is cut into consecutive slices:
        exact, since a row attends only to positions at or before its own, and a slice
        goes in a later pass than the one before it."""
        limit = PREFILL_ROWS[1]
        passes, current, rows = [], [], 0
        for kv, ids, start in pieces:
            for a in range(0, ids.numel(), limit):
                part = ids[a:a + limit]
                if current and (rows + part.numel() > limit or len(current) == RECOMPUTE_BATCH):
                    passes.append(current)
                    current, rows = [], 0
                first = start + a
                positions = torch.arange(first, first + part.numel(), device=self.device)
                current.append(PrefillItem(part, positions, first + part.numel(), kv.block_ids))
                rows += part.numel()
        if current:
            passes.append(current)
        for items in passes:
            if not self.graphs.prefill_batch(items):
                raise RuntimeError(f"kvflow: an isolated pass of {sum(i.ids.numel() for i in items)} "
                                   f"rows in {len(items)} computes did not fit the arena's pass")

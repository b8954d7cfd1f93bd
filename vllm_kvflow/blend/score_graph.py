"""The scoring pass replayed from CUDA graphs.

Infoflow's scoring pass runs the question (tens of tokens) through the first three
quarters of the layers. It does almost no arithmetic, but each layer launches ~15
kernels from Python, so run eagerly it costs ~20 ms of host time on an 8B model against
a few ms of GPU work (benchmarks/ENGINE_GPU_NOTES.md v3). A captured graph replays the
launches without Python.

A graph fixes every shape and every kernel argument, so what changes between requests
lives in static device buffers, refreshed before each replay: the question's token
ids and RoPE positions, its attention positions and cache slots, the block table, the
context length. Graphs are keyed by (question bucket, context bucket), both powers of
two. A question shorter than its bucket is padded with rows that sit at attention
position -1 (they see no key, so they add nothing to the scores), write their K/V into
the first slot of vLLM's null block (block 0, never read unmasked) and take RoPE
position q0. The block table is padded with block 0 up to the context bucket.

Off the GPU (TRITON_INTERPRET=1 on CPU) the same pass runs eagerly on the same padded
buffers, which is how CI checks padding and bucketing against the executor's own score.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("vllm_kvflow")

MIN_ROWS, MAX_ROWS = 16, 256  # question buckets; longer questions run eagerly
MIN_CONTEXT = 2048  # smallest context bucket (keys)


def _bucket(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def enabled() -> bool:
    """KVFLOW_SCORE_GRAPHS=0 turns the graphs off (eager scoring)."""
    return os.environ.get("KVFLOW_SCORE_GRAPHS", "1") not in ("0", "")


@dataclass
class _Buffers:
    """The static inputs and output of one graph."""

    ids: torch.Tensor  # [rows] int64
    rope_pos: torch.Tensor  # [rows] int64
    att_pos: torch.Tensor  # [rows] int32, -1 for padding
    slots: torch.Tensor  # [rows] int64
    table: torch.Tensor  # [1, context bucket // block_size] int32
    seq_len: torch.Tensor  # [1] int32: context + question
    num_context: torch.Tensor  # [1] int32
    cu_rows: torch.Tensor  # [2] int32: [0, rows]
    total: torch.Tensor  # [context bucket] float32: the summed scores

    @classmethod
    def empty(cls, rows: int, context: int, block_size: int, device) -> "_Buffers":
        def i64(n):
            return torch.zeros(n, dtype=torch.long, device=device)

        def i32(n):
            return torch.zeros(n, dtype=torch.int32, device=device)

        return cls(i64(rows), i64(rows), i32(rows), i64(rows),
                   i32((1, context // block_size)), i32(1), i32(1),
                   torch.tensor([0, rows], dtype=torch.int32).to(device),
                   torch.zeros(context, dtype=torch.float32, device=device))

    def fill(self, token_ids, q0: int, context_len: int, block_ids, block_size: int) -> None:
        """This request's values, padded: built on the host, two copies to the device."""
        rows, n = self.ids.numel(), len(token_ids)
        att = np.full(rows, -1, dtype=np.int64)
        att[:n] = context_len + np.arange(n)
        blocks = np.asarray(block_ids, dtype=np.int64)
        slots = np.zeros(rows, dtype=np.int64)  # padding: slot 0 of the null block
        slots[:n] = blocks[att[:n] // block_size] * block_size + att[:n] % block_size
        table = np.zeros(self.table.shape[1], dtype=np.int64)
        used = min(len(blocks), table.size)
        table[:used] = blocks[:used]
        ids = np.zeros(rows, dtype=np.int64)
        ids[:n] = token_ids
        rope = np.full(rows, q0, dtype=np.int64)
        rope[:n] = q0 + np.arange(n)
        # Two host buffers (int64, int32), one copy each to the device, then sliced into
        # the static tensors on the device (not pinned: pinning a fresh buffer per
        # request costs more than copying a few KB).
        wide = torch.from_numpy(np.concatenate([ids, rope, slots]))
        narrow = torch.from_numpy(np.concatenate([att, table, [context_len + n, context_len]])
                                  .astype(np.int32))
        for host, parts in ((wide, (self.ids, self.rope_pos, self.slots)),
                            (narrow, (self.att_pos, self.table, self.seq_len, self.num_context))):
            staged = host.to(self.ids.device)
            t = 0
            for dst in parts:
                dst.view(-1).copy_(staged[t:t + dst.numel()])
                t += dst.numel()


class ScoreGraphs:
    """Per worker: the graphs of the scoring pass over one paged cache."""

    def __init__(self, executor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 block_size: int, layers: list[int], capture: bool | None = None):
        self.executor = executor
        self.keys, self.values = keys, values
        self.flat_keys = [k.view(-1, *k.shape[2:]) for k in keys]
        self.flat_values = [v.view(-1, *v.shape[2:]) for v in values]
        self.block_size = block_size
        self.layers = sorted(layers)
        self.capture = keys[0].is_cuda if capture is None else capture
        self._entries: dict[tuple[int, int], tuple[_Buffers, object]] = {}
        self._pool = None

    def score(self, token_ids, q0: int, context_len: int, block_ids) -> torch.Tensor | None:
        """Attention-norm scores [context_len] (the mean over the scoring layers), or None
        where the question is longer than the largest bucket (score eagerly then)."""
        n = len(token_ids)
        if n == 0 or n > MAX_ROWS:
            return None
        rows = _bucket(n, MIN_ROWS)
        context = _bucket(context_len + rows, max(MIN_CONTEXT, self.block_size))
        key = (rows, context)
        entry = self._entries.get(key)
        if entry is None:  # first request of these buckets: capture with its values
            buf = _Buffers.empty(rows, context, self.block_size, self.keys[0].device)
            buf.fill(token_ids, q0, context_len, block_ids, self.block_size)
            entry = self._entries[key] = (buf, self._capture(buf))
        else:
            entry[0].fill(token_ids, q0, context_len, block_ids, self.block_size)
        buf, graph = entry
        if graph is not None:
            graph.replay()
        else:
            self._pass(buf)
        return buf.total[:context_len] / len(self.layers)

    def _capture(self, buf: _Buffers):
        """A graph of the pass on these buffers; None (eager) off the GPU or if the
        capture fails, which is logged once per bucket."""
        if not self.capture:
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._pass(buf)  # compiles the kernels and sets up cuBLAS outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._pass(buf)
            self._pool = graph.pool()
            return graph
        except Exception as e:  # noqa: BLE001 - eager scoring still works
            logger.warning("kvflow: scoring-pass graph capture failed, scoring eagerly: %s", e)
            return None

    @torch.inference_mode()
    def _pass(self, buf: _Buffers) -> None:
        from vllm_kvflow.kernels.attn_norm import attn_norm
        from vllm_kvflow.kernels.partial_attention import partial_attention

        ex = self.executor
        wanted = set(self.layers)
        scale = ex.shape.scale
        capacity = buf.total.numel()
        buf.total.zero_()

        def attend(layer, q, k, v):
            q, k, v = ex._split_heads(q, k, v)
            self.flat_keys[layer].index_copy_(0, buf.slots, k.to(self.flat_keys[layer].dtype))
            self.flat_values[layer].index_copy_(0, buf.slots, v.to(self.flat_values[layer].dtype))
            if layer in wanted:
                buf.total.add_(attn_norm(q, self.keys[layer], buf.table[0], capacity, buf.att_pos,
                                         buf.num_context, scale, max_context=capacity))
            return partial_attention(q, self.keys[layer], self.values[layer], buf.table,
                                     buf.seq_len, buf.cu_rows, buf.att_pos, scale).flatten(1)

        ex._run(buf.ids, buf.rope_pos, attend, self.layers[-1] + 1)

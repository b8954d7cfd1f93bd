"""The two in-place passes over a request's paged cache, replayed from CUDA graphs.

Infoflow runs the model's own decoder layers twice on a few rows of a request: the
scoring pass (the question, tens of tokens, through the first three quarters of the
layers) and the partial recompute (the rho * T selected tokens, through all of them).
Run eagerly, each layer launches ~15 kernels from Python: ~20 ms of host time per pass
on an 8B model, more than the GPU work of a short pass (benchmarks/ENGINE_GPU_NOTES.md
v3). A captured graph replays the launches without Python.

A graph fixes every shape and every kernel argument, so what changes between requests
lives in static device buffers, refreshed before each replay: the rows' token ids, RoPE
positions and attention positions, the block table, the sequence and context lengths.
Graphs are keyed by (pass, row bucket, context bucket). Rows beyond the request's sit at
attention position -1: they see no key (the kernels give them a zero output, so they add
nothing to the scores) and write their K/V into slot 0 of vLLM's null block (block 0,
never read unmasked). The block table is padded with block 0 up to the context bucket.
Cache slots are derived from the attention positions inside the pass.

Under tensor parallelism the graphs are captured inside vLLM's graph_capture() (see
patches/parallel.py), so that the layers' all-reduce may be captured. Off the GPU
(TRITON_INTERPRET=1 on CPU), and where capture is off (KVFLOW_GRAPHS=0), the same passes
run eagerly on the same buffers: that is how CI checks the padding and bucketing against
the executor's own passes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from vllm_kvflow.patches.parallel import graph_capture_stream

logger = logging.getLogger("vllm_kvflow")

SCORE_ROWS = (16, 256)  # question buckets, powers of two; longer questions: exact size
PREFILL_ROWS = (16, 4096)  # recompute buckets; above, the pass is GPU-bound: run eagerly
MIN_CONTEXT = 2048  # smallest context bucket (keys)
# Graphs kept per worker. Each bucket's first request pays its capture (an eager pass
# and a capture pass) on its own TTFT; past this many, new buckets stay eager, so a
# server seeing every size bucket does not keep paying captures (nor holding hundreds
# of graphs).
MAX_GRAPHS = 64


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def prefill_bucket(n: int) -> int:
    """Rows of the graph that recomputes n tokens: powers of two up to 256, then 16
    steps per octave (padded rows cost linear-layer work: at most 1/16 more)."""
    if n <= 256:
        return _pow2(n, PREFILL_ROWS[0])
    step = 1 << ((n - 1).bit_length() - 5)
    return -(-n // step) * step


def enabled() -> bool:
    """KVFLOW_GRAPHS=0 turns capture off (both passes run eagerly)."""
    return os.environ.get("KVFLOW_GRAPHS", "1") not in ("0", "")


@dataclass
class _Buffers:
    """The static inputs (and, for scoring, output) of one graph."""

    ids: torch.Tensor  # [rows] int64
    rope_pos: torch.Tensor  # [rows] int64
    att_pos: torch.Tensor  # [rows] int32, -1 for padding
    table: torch.Tensor  # [1, context bucket // block_size] int32
    seq_len: torch.Tensor  # [1] int32: keys the rows may see
    num_context: torch.Tensor  # [1] int32: scored columns
    cu_rows: torch.Tensor  # [2] int32: [0, rows]
    total: torch.Tensor | None  # [context bucket] float32: summed scores (scoring only)

    @classmethod
    def empty(cls, rows: int, context: int, block_size: int, device, scores: bool) -> "_Buffers":
        def i32(*shape):
            return torch.zeros(shape, dtype=torch.int32, device=device)

        return cls(torch.zeros(rows, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device),
                   i32(rows), i32(1, context // block_size), i32(1), i32(1),
                   torch.tensor([0, rows], dtype=torch.int32).to(device),
                   torch.zeros(context, dtype=torch.float32, device=device) if scores else None)

    def fill(self, ids, rope_pos, att_pos, block_ids, seq_len, num_context: int = 0) -> None:
        """This request's rows (device tensors of n <= rows entries), padded; block_ids
        the request's blocks (device int64); seq_len an int or a [1] device tensor."""
        n = ids.numel()
        for dst, src, pad in ((self.ids, ids, 0), (self.rope_pos, rope_pos, 0),
                              (self.att_pos, att_pos, -1)):
            dst[:n].copy_(src)
            dst[n:].fill_(pad)
        used = min(block_ids.numel(), self.table.shape[1])
        self.table[0, :used].copy_(block_ids[:used])
        self.table[0, used:].zero_()
        if isinstance(seq_len, torch.Tensor):
            self.seq_len.copy_(seq_len)
        else:
            self.seq_len.fill_(seq_len)
        self.num_context.fill_(num_context)


class PassGraphs:
    """Per worker: the graphs of the scoring and recompute passes over one paged cache."""

    def __init__(self, executor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 block_size: int, scoring_layers: list[int], capture: bool | None = None):
        self.executor = executor
        self.keys, self.values = keys, values
        self.flat_keys = [k.view(-1, *k.shape[2:]) for k in keys]
        self.flat_values = [v.view(-1, *v.shape[2:]) for v in values]
        self.block_size = block_size
        self.scoring_layers = sorted(scoring_layers)
        self.capture = keys[0].is_cuda if capture is None else capture
        self._entries: dict[tuple[str, int, int], tuple[_Buffers, object]] = {}
        self._pool = None
        self._full_logged = False

    # -- the two passes --------------------------------------------------------------------
    def score(self, token_ids: torch.Tensor, q0: int, context_len: int,
              block_ids: torch.Tensor) -> torch.Tensor:
        """Attention-norm scores [context_len], the mean over the scoring layers, of the
        question token_ids (at RoPE positions q0..) attending as if right after the
        context (attention positions context_len..); see LayerwiseExecutor.score.
        token_ids on the device: the pass then never waits for the GPU."""
        n = token_ids.numel()
        if n == 0:
            raise ValueError("scoring needs at least one question token")
        device = self.keys[0].device
        ids = token_ids.to(device)
        rope = torch.arange(q0, q0 + n, device=device)
        att = torch.arange(context_len, context_len + n, device=device)
        rows = _pow2(n, SCORE_ROWS[0]) if n <= SCORE_ROWS[1] else n  # beyond: exact, eager
        context = _pow2(context_len + rows, max(MIN_CONTEXT, self.block_size))
        buf = self._replay("score", rows, context, n <= SCORE_ROWS[1], ids, rope, att,
                           block_ids, context_len + n, context_len)
        return buf.total[:context_len] / len(self.scoring_layers)

    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, context_end: int,
                block_ids: torch.Tensor) -> bool:
        """Recompute the tokens at `positions` (sorted, device, all below context_end) and
        write their K/V, as LayerwiseExecutor.prefill does; False (nothing done) where
        there are more than the largest bucket's rows: the eager pass is as fast there."""
        n = positions.numel()
        if n == 0 or n > PREFILL_ROWS[1]:
            return False
        rows = prefill_bucket(n)
        context = _pow2(context_end, max(MIN_CONTEXT, self.block_size))
        self._replay("prefill", rows, context, True, token_ids, positions, positions,
                     block_ids, positions[-1:] + 1)
        return True

    # -- graphs ------------------------------------------------------------------------------
    def _replay(self, kind, rows, context, cached: bool, ids, rope, att, block_ids, seq_len,
                num_context: int = 0) -> _Buffers:
        """Fill the (kind, rows, context) buffers and run the pass: its graph, captured on
        first use where capture is on; eagerly otherwise. Uncached buffers (a question
        longer than every bucket) are built for this call and run eagerly."""
        key = (kind, rows, context)
        entry = self._entries.get(key) if cached else None
        if entry is None:
            buf = _Buffers.empty(rows, context, self.block_size, self.keys[0].device,
                                 scores=kind == "score")
            buf.fill(ids, rope, att, block_ids, seq_len, num_context)
            graph = self._capture(buf, kind) if cached else None
            if cached:
                self._entries[key] = (buf, graph)
        else:
            buf, graph = entry
            buf.fill(ids, rope, att, block_ids, seq_len, num_context)
        if graph is not None:
            graph.replay()
        else:
            self._pass(buf, kind)
        return buf

    def _capture(self, buf: _Buffers, kind: str):
        """A graph of the pass on these buffers; None (eager) where capture is off or
        fails, which is logged once per bucket."""
        if not self.capture:
            return None
        if sum(graph is not None for _, graph in self._entries.values()) >= MAX_GRAPHS:
            if not self._full_logged:
                logger.info("kvflow: %d pass graphs captured; further size buckets run "
                            "eagerly", MAX_GRAPHS)
                self._full_logged = True
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._pass(buf, kind)  # compiles the kernels and sets up cuBLAS outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # One memory pool for every graph: they never run at the same time.
            with graph_capture_stream(buf.ids.device) as capture_stream, torch.cuda.graph(
                    graph, pool=self._pool, stream=capture_stream,
                    capture_error_mode="thread_local"):
                self._pass(buf, kind)
            self._pool = graph.pool()
            return graph
        except Exception as e:  # noqa: BLE001 - the eager pass still works
            logger.warning("kvflow: %s-pass graph capture failed (%d rows), running eagerly: %s",
                           kind, buf.ids.numel(), e)
            return None

    @torch.inference_mode()
    def _pass(self, buf: _Buffers, kind: str) -> None:
        """Rows through the layers, writing their K/V at their attention positions; the
        scoring pass stops after the last scoring layer and sums attention norms."""
        from vllm_kvflow.kernels.attn_norm import attn_norm
        from vllm_kvflow.kernels.partial_attention import partial_attention

        ex = self.executor
        scale = ex.shape.scale
        bs = self.block_size
        at = buf.att_pos.clamp(min=0).long()
        slots = torch.where(buf.att_pos >= 0, buf.table[0, at // bs].long() * bs + at % bs, 0)
        scoring = kind == "score"
        wanted = set(self.scoring_layers) if scoring else set()
        if scoring:
            buf.total.zero_()
            capacity = buf.total.numel()

        def attend(layer, q, k, v):
            q, k, v = ex.split_heads(q, k, v)
            self.flat_keys[layer].index_copy_(0, slots, k.to(self.flat_keys[layer].dtype))
            self.flat_values[layer].index_copy_(0, slots, v.to(self.flat_values[layer].dtype))
            if layer in wanted:
                buf.total.add_(attn_norm(q, self.keys[layer], buf.table[0], capacity, buf.att_pos,
                                         buf.num_context, scale, max_context=capacity))
            return partial_attention(q, self.keys[layer], self.values[layer], buf.table,
                                     buf.seq_len, buf.cu_rows, buf.att_pos, scale).flatten(1)

        num_layers = self.scoring_layers[-1] + 1 if scoring else None
        ex.run(buf.ids, buf.rope_pos, attend, num_layers)

"""The two in-place passes over requests' paged caches, replayed from CUDA graphs, for
one request or a batch of them.

Infoflow runs the model's own decoder layers twice on a few rows of each request: the
scoring pass (the question, tens of tokens, through the first three quarters of the
layers) and the partial recompute (the rho * T selected tokens, through all of them).
Run eagerly, each layer launches ~15 kernels from Python: ~20 ms of host time per pass
on an 8B model, more than the GPU work of a short pass. A captured graph replays the
launches without Python, and a batched pass carries the rows of several requests
(SCORE_BATCH, RECOMPUTE_BATCH) through each layer's matrix products at once; attention
stays per request (the partial-attention kernel is varlen over requests, the scoring
kernel runs once per request slot).

A graph fixes every shape and every kernel argument, so what changes between replays
lives in static device buffers, refreshed before each one: the rows' token ids, RoPE
positions and attention positions, the request each row belongs to, the block tables,
the sequence and context lengths. Padding rows sit at attention position -1: they see no
key (the kernels give them a zero output, so they add nothing to the scores) and write
their K/V into slot 0 of vLLM's null block (block 0, never read unmasked). Block tables
are padded with block 0; padding requests have no rows.

- Scoring graphs are keyed by (row bucket, context bucket, batch bucket). Each request
  has a fixed slot of rows (its bucket), so the per-request scoring calls see static
  slices; its few rows need key splits to fill the GPU, and the splits depend on the
  context, hence the context bucket. Those of short questions are captured at engine
  start (capture_scoring), every context and batch bucket; a longer question's on
  first use.
- Recompute graphs are keyed by their row bucket alone: the requests' rows are packed
  one after another, the batch always has RECOMPUTE_BATCH request slots (padding ones
  cost nothing), the block table is as wide as the longest context (the attention reads
  only up to each request's length), and the attention runs without key splits. So
  under load, where a step's recompute fills the step's row budget, one or two graphs
  serve every step, and every bucket up to that budget is captured at engine start
  (capture_recompute): serving never pays a capture for them.

Under tensor parallelism the graphs are captured inside vLLM's graph_capture() (see
patches/parallel.py), so that the layers' all-reduce may be captured. Off the GPU
(TRITON_INTERPRET=1 on CPU), and where capture is off (KVFLOW_GRAPHS=0), the same passes
run eagerly on the same buffers: that is how CI checks the padding and bucketing against
the executor's own passes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from vllm_kvflow.blend.private_stream import keep_alive, private_stream
from vllm_kvflow.patches.parallel import graph_capture_stream

logger = logging.getLogger("vllm_kvflow")

SCORE_ROWS = (16, 256)  # question buckets, powers of two; longer questions: exact size
PREFILL_ROWS = (16, 4096)  # recompute buckets; above, the pass is GPU-bound: run eagerly
MIN_CONTEXT = 2048  # smallest context bucket of the scoring graphs (keys)
# Requests per batched scoring pass; batch buckets are powers of two up to it (padding
# requests' slots would carry rows through the layers).
SCORE_BATCH = 16
# Requests per batched recompute pass, always (padding requests have no rows): the
# partial-attention kernel's varlen lookup holds up to 31 (its MAX_SEQS).
RECOMPUTE_BATCH = 31
# No key splits in the recompute graphs: a table as wide as the longest context would
# give splits that fall mostly beyond a request's keys.
NO_SPLITS = {"splits": 1}
# Graphs kept per PassGraphs (a worker has one, and one more over the isolated arena).
# Each bucket's first replay pays its capture (an eager pass and a capture pass); past
# this many, new buckets stay eager, so a server seeing every size bucket does not keep
# paying captures (nor holding hundreds of graphs).
MAX_GRAPHS = 128


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def prefill_bucket(n: int) -> int:
    """Rows of the graph that recomputes n tokens: powers of two up to 256, then 8
    steps per octave (padded rows cost linear-layer work, at most 1/8 more; fewer
    buckets are fewer graphs to capture at engine start)."""
    if n <= 256:
        return _pow2(n, PREFILL_ROWS[0])
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


def recompute_buckets(max_rows: int) -> list[int]:
    """Every recompute row bucket up to the one holding max_rows (at most the largest)."""
    last = prefill_bucket(max(1, min(max_rows, PREFILL_ROWS[1])))
    buckets = [prefill_bucket(1)]
    while buckets[-1] < last:
        buckets.append(prefill_bucket(buckets[-1] + 1))
    return buckets


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, ... up to hi (both powers of two)."""
    return [1 << i for i in range(lo.bit_length() - 1, hi.bit_length())]


def score_buckets(max_question: int, max_context: int, block_size: int) -> list[tuple[int, int, int]]:
    """The (question slot, context bucket, batch bucket) of every scoring graph that a
    question of up to max_question tokens, over contexts of up to max_context tokens,
    can meet: smallest contexts first (the common ones, and the first kept where a
    capture budget cuts the list)."""
    slots = _powers_of_two(SCORE_ROWS[0], min(_pow2(max_question, SCORE_ROWS[0]), SCORE_ROWS[1]))
    out = []
    context = max(MIN_CONTEXT, block_size)
    while True:
        out += [(slot, context, batch) for slot in slots for batch in _powers_of_two(1, SCORE_BATCH)]
        if context >= max_context:
            return out
        context *= 2


def enabled() -> bool:
    """KVFLOW_GRAPHS=0 turns capture off (both passes run eagerly)."""
    return os.environ.get("KVFLOW_GRAPHS", "1") not in ("0", "")


@dataclass
class ScoreItem:
    """One request's question: token ids (device), its first RoPE position, the number
    of context columns it scores, the request's blocks (device int64)."""

    ids: torch.Tensor
    q0: int
    context_len: int
    block_ids: torch.Tensor


@dataclass
class PrefillItem:
    """One request's recompute: token ids and positions (sorted, device), the end of its
    context, its blocks (device int64)."""

    ids: torch.Tensor
    positions: torch.Tensor
    context_end: int
    block_ids: torch.Tensor


@dataclass
class _Buffers:
    """The static inputs (and, for scoring, output) of one graph."""

    ids: torch.Tensor  # [rows] int64
    rope_pos: torch.Tensor  # [rows] int64
    att_pos: torch.Tensor  # [rows] int32, -1 for padding
    row_seq: torch.Tensor  # [rows] int64: the request of each row
    table: torch.Tensor  # [batch, context bucket // block_size] int32
    seq_len: torch.Tensor  # [batch] int32: keys each request's rows may see
    num_context: torch.Tensor  # [batch] int32: scored columns
    cu_rows: torch.Tensor  # [batch + 1] int32: row offsets of the requests
    total: torch.Tensor | None  # [batch, context bucket] float32 (scoring only)

    @classmethod
    def empty(cls, rows: int, context: int, batch: int, block_size: int, device,
              scores: bool) -> "_Buffers":
        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(rows, dtype=torch.long), zeros(rows, dtype=torch.long), zeros(rows),
                   zeros(rows, dtype=torch.long), zeros(batch, context // block_size),
                   zeros(batch), zeros(batch), zeros(batch + 1),
                   zeros(batch, context, dtype=torch.float32) if scores else None)

    def first_rows(self, rows: int) -> "_Buffers":
        """These buffers cut to their first `rows` rows (views: one set of buffers
        serves every recompute graph, since graphs never run at the same time)."""
        return _Buffers(self.ids[:rows], self.rope_pos[:rows], self.att_pos[:rows],
                        self.row_seq[:rows], self.table, self.seq_len, self.num_context,
                        self.cu_rows, self.total)

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    def fill(self, starts: list[int], ids, rope_pos, att_pos, block_ids, seq_lens,
             num_context: list[int], cu_rows: list[int]) -> None:
        """Request b's rows at starts[b] (device tensors per request), padded; block_ids
        per request (device int64); seq_lens per request, an int or a [1] device tensor;
        cu_rows the batch + 1 row offsets the attention kernel reads."""
        self.att_pos.fill_(-1)
        self.ids.zero_()
        self.rope_pos.zero_()
        self.table.zero_()
        self.seq_len.zero_()
        last = len(starts) - 1
        self.row_seq.fill_(last)  # padding rows: the last request's, at position -1
        for b, start in enumerate(starts):
            n = ids[b].numel()
            self.ids[start:start + n].copy_(ids[b])
            self.rope_pos[start:start + n].copy_(rope_pos[b])
            self.att_pos[start:start + n].copy_(att_pos[b])
            self.row_seq[start:start + n].fill_(b)
            used = min(block_ids[b].numel(), self.table.shape[1])
            self.table[b, :used].copy_(block_ids[b][:used])
            if isinstance(seq_lens[b], torch.Tensor):
                self.seq_len[b:b + 1].copy_(seq_lens[b])
            else:
                self.seq_len[b].fill_(seq_lens[b])
        # Scalars go in by fill_ (a launch each, no host copy: a copy from pageable host
        # memory would make the host wait for the GPU).
        self.num_context.zero_()
        for b, n in enumerate(num_context):
            if n:
                self.num_context[b].fill_(n)
        # A recompute's padding requests all end where the rows end (31 slots, most
        # unused): their equal offsets go in with one launch.
        tail = len(cu_rows) - 1
        while tail > 0 and cu_rows[tail - 1] == cu_rows[-1]:
            tail -= 1
        for b, offset in enumerate(cu_rows[:tail]):
            self.cu_rows[b].fill_(offset)
        self.cu_rows[tail:].fill_(cu_rows[-1])


class PassGraphs:
    """Per worker: the graphs of the scoring and recompute passes over one paged cache."""

    def __init__(self, executor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 block_size: int, scoring_layers: list[int], capture: bool | None = None,
                 max_context: int | None = None, capture_while_serving: bool = True,
                 pool_of: "PassGraphs | None" = None):
        """max_context: the longest context a request may have (vLLM's max_model_len);
        by default every slot of the cache. capture_while_serving False: only
        capture_recompute (engine start) captures; other buckets run eagerly. pool_of:
        the graphs whose memory pool these share (passes never run at the same time)."""
        self.executor = executor
        self.keys, self.values = keys, values
        self.flat_keys = [k.view(-1, *k.shape[2:]) for k in keys]
        self.flat_values = [v.view(-1, *v.shape[2:]) for v in values]
        self.block_size = block_size
        self.scoring_layers = sorted(scoring_layers)
        self.capture = keys[0].is_cuda if capture is None else capture
        slots = keys[0].shape[0] * block_size
        self.max_blocks = -(-min(max_context or slots, slots) // block_size)
        self._entries: dict[tuple, tuple[_Buffers, object]] = {}
        self._recompute_buffers: _Buffers | None = None
        self._pool = None
        self._pool_owner = pool_of or self
        self.capture_while_serving = capture_while_serving
        self._full_logged = False
        self._at_start = False  # capture_recompute at engine start: captures log at DEBUG

    # -- the two passes --------------------------------------------------------------------
    def score(self, token_ids: torch.Tensor, q0: int, context_len: int,
              block_ids: torch.Tensor) -> torch.Tensor:
        """Attention-norm scores [context_len], the mean over the scoring layers, of the
        question token_ids (at RoPE positions q0..) attending as if right after the
        context (attention positions context_len..); see LayerwiseExecutor.score_groups.
        token_ids on the device: the pass then never waits for the GPU."""
        return self.score_batch([ScoreItem(token_ids, q0, context_len, block_ids)])[0]

    def score_batch(self, items: list[ScoreItem]) -> list[torch.Tensor]:
        """score() for several requests, SCORE_BATCH per pass."""
        if any(it.ids.numel() == 0 for it in items):
            raise ValueError("scoring needs at least one question token")
        out = []
        for i in range(0, len(items), SCORE_BATCH):
            out += self._score_batch(items[i:i + SCORE_BATCH])
        return out

    def _score_batch(self, items: list[ScoreItem]) -> list[torch.Tensor]:
        device = self.keys[0].device
        longest = max(it.ids.numel() for it in items)
        cached = longest <= SCORE_ROWS[1]
        slot = _pow2(longest, SCORE_ROWS[0]) if cached else longest  # beyond: exact, eager
        batch = _pow2(len(items), 1) if cached else len(items)
        context = _pow2(max(it.context_len for it in items) + slot, max(MIN_CONTEXT, self.block_size))
        ids, rope, att, seq_lens = [], [], [], []
        for it in items:
            n = it.ids.numel()
            ids.append(it.ids.to(device))
            rope.append(torch.arange(it.q0, it.q0 + n, device=device))
            att.append(torch.arange(it.context_len, it.context_len + n, device=device))
            seq_lens.append(it.context_len + n)
        starts = [b * slot for b in range(len(items))]
        cu_rows = [b * slot for b in range(batch + 1)]
        key, make_buffers = self._score_graph(slot, context, batch)
        buf = self._replay(
            "score", key if cached else None, make_buffers, starts, ids, rope, att, [it.block_ids for it in items], seq_lens,
            [it.context_len for it in items], cu_rows)
        layers = len(self.scoring_layers)
        return [buf.total[b, :it.context_len] / layers for b, it in enumerate(items)]

    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, context_end: int,
                block_ids: torch.Tensor) -> bool:
        """Recompute the tokens at `positions` (sorted, device, all below context_end) and
        write their K/V, as LayerwiseExecutor.prefill does; False (nothing done) where
        there are more than the largest bucket's rows: the eager pass is as fast there."""
        return self.prefill_batch([PrefillItem(token_ids, positions, context_end, block_ids)])

    def prefill_batch(self, items: list[PrefillItem]) -> bool:
        """prefill() for up to RECOMPUTE_BATCH requests in one pass; False (nothing done)
        where they have no rows or more rows together than the largest bucket."""
        n = sum(it.positions.numel() for it in items)
        if n == 0 or n > PREFILL_ROWS[1] or len(items) > RECOMPUTE_BATCH:
            return False
        items = [it for it in items if it.positions.numel()]
        if max(it.context_end for it in items) > self.max_blocks * self.block_size:
            return False  # longer than max_context: the executor's eager pass has no table
        starts, offset = [], 0
        for it in items:
            starts.append(offset)
            offset += it.positions.numel()
        positions = [it.positions for it in items]
        self._recompute(prefill_bucket(n), starts, [it.ids for it in items], positions, positions,
                        [it.block_ids for it in items], [p[-1:] + 1 for p in positions])
        return True

    def capture_recompute(self, max_rows: int) -> int:
        """Capture now (engine start) the recompute graph of every row bucket up to the
        one holding max_rows, so that serving replays them; how many were captured. Each
        capture runs one padding-only pass (it writes only the null block's slot 0)."""
        def capture() -> None:
            zero = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)
            for rows in recompute_buckets(max_rows):  # one request of one padding row
                self._recompute(rows, [0], [zero], [zero], [zero - 1], [zero], [0])

        return self._captured_at_start(capture)

    def capture_scoring(self, max_question: int, limit: int) -> int:
        """Capture now (engine start) the scoring graphs of questions of up to
        max_question tokens (score_buckets), at most `limit` of them; how many were
        captured. Serving would otherwise capture each bucket on first use: ~40 ms of
        eager pass and capture inside a step, with a device-wide sync (torch.cuda.graph),
        in the step of every request that meets a new one. Each capture runs one
        padding-only pass: rows at attention position -1, no context column, writes to
        the null block's slot 0 only."""
        def capture() -> None:
            zero = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)
            for slot, context, batch in score_buckets(max_question, self.max_blocks * self.block_size,
                                                      self.block_size)[:max(0, limit)]:
                key, make_buffers = self._score_graph(slot, context, batch)
                if key in self._entries:
                    continue
                one = [zero] * batch  # one padding row per request
                self._replay("score", key, make_buffers, [b * slot for b in range(batch)], one, one,
                             [zero - 1] * batch, one, [0] * batch, [0] * batch,
                             [b * slot for b in range(batch + 1)])

        return self._captured_at_start(capture)

    def _captured_at_start(self, capture) -> int:
        """Run capture() as the engine start's (its captures log at DEBUG: the "pipeline
        ready" line sums them up); how many graphs it added. Nothing where capture is off."""
        if not self.capture:
            return 0
        before = len(self._entries)
        self._at_start = True
        try:
            capture()
        finally:
            self._at_start = False
        return len(self._entries) - before

    def _score_graph(self, slot: int, context: int, batch: int):
        """The key of the scoring graph of `batch` request slots of `slot` rows over
        `context` keys, and how to make its buffers."""
        return ("score", slot * batch, context, batch), lambda: _Buffers.empty(
            slot * batch, context, batch, self.block_size, self.keys[0].device, scores=True)

    def _recompute(self, rows: int, starts, ids, rope_pos, att_pos, block_ids, seq_lens) -> None:
        # The padding rows and requests join the last request (at position -1 they see
        # nothing; a padding request has no rows).
        cu_rows = starts + [rows] * (RECOMPUTE_BATCH + 1 - len(starts))
        self._replay("prefill", ("prefill", rows), lambda: self._shared_recompute_buffers(rows),
                     starts, ids, rope_pos, att_pos, block_ids, seq_lens, [0] * len(starts),
                     cu_rows)

    def _shared_recompute_buffers(self, rows: int) -> _Buffers:
        if self._recompute_buffers is None:
            self._recompute_buffers = _Buffers.empty(
                PREFILL_ROWS[1], self.max_blocks * self.block_size, RECOMPUTE_BATCH,
                self.block_size, self.keys[0].device, scores=False)
        return self._recompute_buffers.first_rows(rows)

    # -- graphs ------------------------------------------------------------------------------
    def _replay(self, kind: str, key: tuple | None, make_buffers, *fill_args) -> _Buffers:
        """Fill the buffers of `key` and run the pass: its graph, captured on first use
        where capture is on; eagerly otherwise. key None (a question longer than every
        bucket): buffers built for this call (make_buffers()), run eagerly."""
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            buf = make_buffers()
            buf.fill(*fill_args)
            graph = self._capture(buf, kind) if key is not None else None
            # Kept, graph or not (a bucket past MAX_GRAPHS stays eager); except, where only
            # the engine start captures, a bucket met first while serving.
            if key is not None and (graph is not None or self.capture_while_serving):
                self._entries[key] = (buf, graph)
        else:
            buf, graph = entry
            buf.fill(*fill_args)
        if graph is not None:
            graph.replay()
        else:
            self._pass(buf, kind)
        return buf

    def _capture(self, buf: _Buffers, kind: str):
        """A graph of the pass on these buffers; None (eager) where capture is off or
        fails, which is logged once per bucket."""
        if not self.capture or not (self._at_start or self.capture_while_serving):
            return None
        if sum(graph is not None for _, graph in self._entries.values()) >= MAX_GRAPHS:
            if not self._full_logged:
                logger.info("kvflow: %d pass graphs captured; further size buckets run "
                            "eagerly", MAX_GRAPHS)
                self._full_logged = True
            return None
        t0 = time.perf_counter()
        try:
            stream = private_stream(buf.ids.device, "capture", fallback_priority=-1)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._pass(buf, kind)  # compiles the kernels and sets up cuBLAS outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = keep_alive(torch.cuda.CUDAGraph())
            # One memory pool for every graph: they never run at the same time.
            owner = self._pool_owner
            with graph_capture_stream(buf.ids.device) as capture_stream, torch.cuda.graph(
                    graph, pool=owner._pool, stream=capture_stream,
                    capture_error_mode="thread_local"):
                self._pass(buf, kind)
            owner._pool = graph.pool()
        except Exception as e:  # noqa: BLE001 - the eager pass still works
            logger.warning("kvflow: %s-pass graph capture failed (%d rows), running eagerly: %s",
                           kind, buf.ids.numel(), e)
            return None
        # A capture while serving holds up the step it happens in (an eager pass, then the
        # capture): one line per bucket, so a server's log shows how often serving met a
        # new one. Those of the engine start are summed up by its "pipeline ready" line.
        logger.log(logging.DEBUG if self._at_start else logging.INFO,
                   "kvflow: %s-pass graph captured for %d rows in %.0f ms (%d graphs)", kind,
                   buf.ids.numel(), 1e3 * (time.perf_counter() - t0),
                   1 + sum(g is not None for _, g in self._entries.values()))
        return graph

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
        slots = torch.where(buf.att_pos >= 0, buf.table[buf.row_seq, at // bs].long() * bs + at % bs, 0)
        scoring = kind == "score"
        wanted = set(self.scoring_layers) if scoring else set()
        if scoring:
            buf.total.zero_()
            capacity = buf.total.shape[1]
            slot = buf.ids.numel() // buf.batch

        def attend(layer, q, k, v):
            q, k, v = ex.split_heads(q, k, v)
            self.flat_keys[layer].index_copy_(0, slots, k.to(self.flat_keys[layer].dtype))
            self.flat_values[layer].index_copy_(0, slots, v.to(self.flat_values[layer].dtype))
            if layer in wanted:
                for b in range(buf.batch):
                    rows = slice(b * slot, (b + 1) * slot)
                    buf.total[b].add_(attn_norm(q[rows], self.keys[layer], buf.table[b], capacity,
                                                buf.att_pos[rows], buf.num_context[b:b + 1], scale,
                                                max_context=capacity))
            return partial_attention(q, self.keys[layer], self.values[layer], buf.table,
                                     buf.seq_len, buf.cu_rows, buf.att_pos, scale,
                                     config=None if scoring else NO_SPLITS).flatten(1)

        num_layers = self.scoring_layers[-1] + 1 if scoring else None
        ex.run(buf.ids, buf.rope_pos, attend, num_layers)

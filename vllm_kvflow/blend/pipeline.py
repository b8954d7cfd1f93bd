"""The worker's blend work for requests: fill each request's paged KV for
[load_start, context_end), in steps that the work queue (blend/work_queue.py) batches
across requests:

1. resolve: look each chunk up in the store and each glue segment (the tokens around the
   chunks) in the glue cache; what is missing becomes an isolated compute;
2. compute_isolated: missing chunks and glue, each computed alone behind the sink (glue at
   the prompt's start with nothing before it, so exactly), many per batched pass;
3. load: every segment's K (re-rotated to its global positions) and V written into the
   request's blocks;
4. select: the method's signals (blend/signals.py), then its selection of ratio * T of
   the T candidate tokens (every reused token whose KV is not exact already);
5. recompute: the selected tokens of several requests, layer by layer over each
   request's mixed cache, in one batched pass.
The prompt's remaining tokens are then prefilled by vLLM itself over this cache. The
method of a request (blend/selection.py) says which signals it needs, whether it
recomputes and whether it reorders the chunks; nothing here names a method.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vllm_kvflow.blend import isolated_arena, pass_graphs
from vllm_kvflow.blend.dense_batch import arena_order, dense_kv_many
from vllm_kvflow.blend.executor import LayerwiseExecutor, RowGroup
from vllm_kvflow.blend.glue import GlueCache
from vllm_kvflow.blend.host_ints import device_ints
from vllm_kvflow.blend.isolated_arena import ArenaKV, IsolatedArena, arena_rows
from vllm_kvflow.blend.paged import DenseKV, PagedKV, use_kernels
from vllm_kvflow.blend.pass_graphs import PassGraphs, PrefillItem
from vllm_kvflow.blend.selection import Method, SelectionInput, budget_for, method, select
from vllm_kvflow.blend.signals import compute_signals
from vllm_kvflow.config import KVFlowConfig, resolve_layers
from vllm_kvflow.store import ChunkKV, ChunkStore, chunk_key

logger = logging.getLogger("vllm_kvflow")

# Questions (with their generation prompt) of up to this many tokens have their scoring
# graphs captured at engine start, for every context and batch bucket (longer ones on
# first use while serving): RAG questions are mostly a sentence or two.
START_SCORE_QUESTION = 64


@dataclass
class LoadPlan:
    """Scheduler -> worker: everything the worker needs for one request's load."""

    req_id: str
    token_ids: list[int]  # the prompt
    chunks: list[tuple[int, int]]
    question: tuple[int, int]
    method: str
    ratio: float
    namespace: str
    load_start: int  # positions below are already in the cache (local prefix hit)
    block_ids: list[int]
    # Loaded within the step it is scheduled in (vLLM's forward of that step reads the
    # KV), not asynchronously: a lone request on an idle engine, which nothing else
    # waits for, saves the extra engine steps of an asynchronous load.
    sync: bool = False

    @property
    def context_end(self) -> int:
        return self.chunks[-1][1]


@dataclass
class LoadResult:
    chunks_hit: int = 0
    chunks_missed: int = 0
    chunks_exact: int = 0
    tokens_reused: int = 0  # chunk tokens whose KV came from the store
    tokens_glue: int = 0  # context tokens outside chunks, KV from the glue cache
    candidate_tokens: int = 0  # reused tokens whose KV is not exact (selection's T)
    tokens_recomputed: int = 0  # candidates recomputed over the mixed cache
    reorder: list[int] | None = None  # methods that reorder: the chunk order used
    batched_with: int = 0  # other requests in the same recompute pass
    kernel_fallbacks: int = 0  # loads the fused kernel could not do (gathered instead)
    selected_positions: list[int] | None = None  # recomputed positions, with debug_selection
    timer: _Timer | None = field(default=None, repr=False)  # -> timings_s in as_dict()

    def as_dict(self) -> dict:
        """The stats, with `timings_s` per phase (on CUDA this waits for the load's GPU
        work: call it after the step's forward is launched)."""
        out = {k: v for k, v in self.__dict__.items() if k != "timer"}
        out["timings_s"] = self.timer.resolve() if self.timer is not None else {}
        return out


@dataclass
class Segment:
    """A run of the context the load fills from one cached entry: a chunk (from the
    store) or glue (from the glue cache)."""

    start: int
    end: int
    is_chunk: bool
    key: object  # store key (chunk) or glue-cache key (glue)
    token_ids: tuple[int, ...]
    sink: tuple[int, ...]  # what the entry is computed behind, at positions 0..
    exact: bool  # its cached KV is exact at its place: never a recompute candidate
    first: int  # first position to write (load_start may cut into it)
    entry: ChunkKV | None = None


@dataclass
class IsolatedCompute:
    """A store miss (or glue-cache miss) to compute alone; shared by every job that
    waits for the same key."""

    key: object
    token_ids: tuple[int, ...]
    sink: tuple[int, ...]
    is_chunk: bool

    @property
    def rows(self) -> int:
        return len(self.sink) + len(self.token_ids)


@dataclass
class IsolatedRun:
    """An isolated compute under way: its [sink][tokens] ids, its KV buffer (private, or a
    slice of one shared with the computes started beside it) and how many rows
    (positions 0..done-1) are computed."""

    task: IsolatedCompute
    ids: torch.Tensor
    kv: DenseKV | ArenaKV
    done: int = 0

    @property
    def rows_left(self) -> int:
        return int(self.ids.numel()) - self.done

    def entry(self) -> ChunkKV:
        """The completed run's KV of its tokens (the sink's part dropped), copied out of
        its buffer, which is then released."""
        sink = len(self.task.sink)
        keys, values = self.kv.copy_rows(sink, int(self.ids.numel()))
        self.kv.release()
        return ChunkKV(tuple(int(t) for t in self.task.token_ids), keys, values, local_start=sink)


@dataclass
class Job:
    """One request's load as it moves through the worker's steps."""

    plan: LoadPlan
    kv: PagedKV
    method: Method
    result: LoadResult
    segments: list[Segment] = field(default_factory=list)
    ids: torch.Tensor | None = None  # the prompt on the device (None: nothing reads it)
    candidates: list[tuple[int, int]] = field(default_factory=list)
    inp: SelectionInput | None = None
    chosen: torch.Tensor | None = None  # the positions to recompute, sorted
    recomputed: int = 0  # how many of them are done (in position order)

    @property
    def req_id(self) -> str:
        return self.plan.req_id

    @property
    def ratio(self) -> float:
        return self.plan.ratio if self.method.recomputes else 0.0

    def missing(self) -> list[Segment]:
        return [s for s in self.segments if s.entry is None]

    def rows_left(self) -> int:
        """Selected tokens not recomputed yet (0 before the selection)."""
        return 0 if self.chosen is None else int(self.chosen.numel()) - self.recomputed


def reordered_layout(token_ids: list[int], chunks: list[tuple[int, int]], order: list[int]):
    """The prompt with chunk slot k holding chunk order[k]; glue stays in place, chunks
    stay contiguous. Returns (token ids, new chunk spans in slot order)."""
    if sorted(order) != list(range(len(chunks))):
        raise ValueError(f"order {order} is not a permutation of {len(chunks)} chunks")
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for (c0, c1), src in zip(chunks, order):
        ids += token_ids[cursor:c0]
        s0, s1 = chunks[src]
        spans.append((len(ids), len(ids) + s1 - s0))
        ids += token_ids[s0:s1]
        cursor = c1
    ids += token_ids[cursor:]
    return ids, spans


def context_segments(chunks: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """[0, end of the last chunk) cut into (start, end, is_chunk) segments: the chunks
    and the glue runs before and between them."""
    segments, cursor = [], 0
    for c0, c1 in chunks:
        if cursor < c0:
            segments.append((cursor, c0, False))
        segments.append((c0, c1, True))
        cursor = c1
    return segments


def _positions(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """The positions of sorted spans, concatenated: one host-built tensor, one copy."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return device_ints(np.concatenate([np.arange(a, b) for a, b in spans]), device)


class _Timer:
    """Wall time per phase of one load. On CUDA each phase is bracketed by two events,
    read only after the fact (resolve), so timing never makes the host wait for the GPU:
    vLLM launches the step's forward while the load's last kernels still run. A phase's
    time is then from where the GPU reached its start to where it finished its work. A
    phase that runs batched over several requests counts its whole time for each."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str, *also: "_Timer"):
        start = self._mark()
        yield
        end = self._mark()
        for timer in (self, *also):
            timer.spans.append((name, start, end))

    def _mark(self):
        if not self.on_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self) -> dict[str, float]:
        """Seconds per phase (waits for the last phase's GPU work on CUDA)."""
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            if self.on_cuda:
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = end - start
            out[name] = out.get(name, 0.0) + seconds
        return out


@contextlib.contextmanager
def _timed(jobs: list[Job], name: str):
    """One phase, timed once, counted for every job of the batch."""
    timers = [j.result.timer for j in jobs if j.result.timer is not None]
    if not timers:
        yield
        return
    with timers[0](name, *timers[1:]):
        yield


# Bytes of chunk K/V gathered at once when writing a request's chunks (torch path), and
# of host-tier entries staged on the device at once (kernel path).
_GATHER_BYTES = 1 << 30
_STAGE_BYTES = 1 << 30


_warned: set[str] = set()


def _warn_once(reason: str, message: str) -> None:
    """Log `message` the first time `reason` occurs (not per distinct message, which
    carries shapes and would grow without bound)."""
    if reason not in _warned:
        _warned.add(reason)
        logger.warning(message)


def capture_graphs(on_cuda: bool) -> bool:
    """Whether the in-place passes are captured in CUDA graphs: on CUDA unless
    KVFLOW_GRAPHS=0 (under tensor parallelism inside vLLM's graph_capture(), see
    pass_graphs)."""
    return on_cuda and pass_graphs.enabled()


class BlendPipeline:
    """Per-worker: executor + store + settings. One instance per worker process."""

    def __init__(self, executor: LayerwiseExecutor, store: ChunkStore, config: KVFlowConfig,
                 model_id: str, sink_ids: tuple[int, ...], max_model_len: int | None = None):
        self.executor = executor
        self.max_model_len = max_model_len  # the longest context (the pass graphs' tables)
        self.adapter = executor.adapter
        self.store = store
        self.config = config
        self.model_id = model_id
        self.sink_ids = tuple(sink_ids)
        self.glue = GlueCache()
        self._graphs: tuple[tuple, PassGraphs] | None = None
        self._arena: IsolatedArena | None = None  # built at engine start (warm_up)
        self.scoring_layers = resolve_layers(config.scoring_layers, self.adapter.num_layers)
        cache, self.rotary_dim, self.is_neox = self.adapter.rope_cache()
        self.cos_sin = cache.float()

    # -- 1. resolve -----------------------------------------------------------------------
    def new_job(self, plan: LoadPlan, kv: PagedKV) -> Job:
        return Job(plan, kv, method(plan.method), LoadResult(timer=_Timer(self.adapter.device)))

    def resolve(self, job: Job) -> list[IsolatedCompute]:
        """Cut the job's context into segments and look each up (store for chunks, glue
        cache for glue). Returns what is missing, to compute in isolation."""
        plan, prompt = job.plan, job.plan.token_ids
        s = len(self.sink_ids)
        exact_prefix = tuple(prompt[:s]) == self.sink_ids
        job.segments, missing = [], []
        for c0, c1, is_chunk in context_segments(plan.chunks):
            if c1 <= plan.load_start:
                continue  # wholly inside the local prefix-cache hit
            ids = tuple(prompt[c0:c1])
            if is_chunk:
                sink = self.sink_ids
                key = chunk_key(self.model_id, plan.namespace, sink, ids)
                # Same tokens before it as in isolation, same positions: exact KV.
                exact = exact_prefix and c0 == s
                entry = self.store.get(key, ids)
            else:
                # Glue is per namespace, like chunks: one tenant's cache hits (timing) say
                # nothing about another's system prompt.
                sink = () if c0 == 0 else self.sink_ids
                key = (plan.namespace, c0 == 0, ids)
                exact = c0 == 0
                entry = self.glue.get(key)
            seg = Segment(c0, c1, is_chunk, key, ids, sink, exact, max(c0, plan.load_start), entry)
            job.segments.append(seg)
            if is_chunk:
                job.result.chunks_hit += entry is not None
                job.result.chunks_missed += entry is None
                job.result.chunks_exact += exact
            if entry is None:
                missing.append(self.isolated_compute_for(seg))
        return missing

    @staticmethod
    def isolated_compute_for(seg: Segment) -> IsolatedCompute:
        return IsolatedCompute(seg.key, seg.token_ids, seg.sink, seg.is_chunk)

    # -- 2. isolated computes -----------------------------------------------------------------
    def fetch_shared(self, task: IsolatedCompute) -> ChunkKV | None:
        """A chunk another replica stored (the shared tier) since this request missed it:
        fetched instead of computed. Glue is never shared."""
        return self.store.get_shared(task.key, task.token_ids) if task.is_chunk else None

    def compute_isolated_batch(self, tasks: list[IsolatedCompute]) -> list[ChunkKV]:
        """Each task's KV, computed alone behind its sink at positions 0.., in one pass
        for all of them; chunks go into the store, glue into the glue cache."""
        return [self.finish_isolated(run) for run in self._compute_runs(tasks)]

    def _compute_runs(self, tasks: list[IsolatedCompute]) -> list[IsolatedRun]:
        """The tasks' runs, started and computed whole in one batched pass."""
        runs = self.start_isolated(tasks)
        self.advance_isolated([(run, run.rows_left) for run in runs])
        return runs

    def start_isolated(self, tasks: list[IsolatedCompute]) -> list[IsolatedRun]:
        """The isolated computes' buffers, to be filled in one or more slices: pages of
        the arena, where there is one and it has room (its passes replay CUDA graphs:
        blend/isolated_arena.py); else, on the kernel path, slices of one buffer shared
        by the rest, so that their pass still attends for all of them at once; elsewhere
        nothing batches attention over such a buffer, and each keeps its own."""
        if not tasks:
            return []
        device = self.adapter.device
        shape = self.adapter.shape
        dtype = next(self.adapter.model.parameters()).dtype
        ids = [device_ints(t.sink + tuple(t.token_ids), device) for t in tasks]
        caps = [x.numel() for x in ids]
        bufs: list = [self._arena.allocate(cap) if self._arena else None for cap in caps]
        rest = [n for n, buf in enumerate(bufs) if buf is None]
        if rest:
            layers, rest_caps = self.adapter.num_layers, [caps[n] for n in rest]
            args = (shape.num_kv_heads, shape.head_dim, dtype, device)
            own = (dense_kv_many(layers, rest_caps, *args) if use_kernels(ids[0])
                   else [DenseKV.empty(layers, cap, *args) for cap in rest_caps])
            for n, buf in zip(rest, own):
                bufs[n] = buf
        return [IsolatedRun(t, x, buf) for t, x, buf in zip(tasks, ids, bufs)]

    def advance_isolated(self, takes: list[tuple[IsolatedRun, int]]) -> None:
        """The next `take` rows of each run: the arena's in its graphs' passes, the
        others in one batched eager pass. Exact in slices: a row attends only to earlier
        positions, which earlier slices have written."""
        device = self.adapter.device
        groups, pieces = [], []
        for run, take in arena_order(takes, lambda t: t[0].kv):
            if not 0 < take <= run.rows_left:  # past the buffer's end would write out of it
                raise ValueError(f"kvflow: slice of {take} rows, {run.rows_left} left")
            ids = run.ids[run.done:run.done + take]
            if isinstance(run.kv, ArenaKV):
                pieces.append((run.kv, ids, run.done))
            else:
                positions = torch.arange(run.done, run.done + take, device=device)
                groups.append(RowGroup(ids, positions, run.kv, length=run.done + take))
        if pieces:
            self._arena.advance(pieces)
        self.executor.prefill_groups(groups)
        for run, take in takes:
            run.done += take

    def finish_isolated(self, run: IsolatedRun) -> ChunkKV:
        """A completed run's entry (the tokens' part, without the sink), stored: chunks
        in the store, glue in the glue cache."""
        entry = run.entry()
        (self.store if run.task.is_chunk else self.glue).put(run.task.key, entry)
        return entry

    def compute_isolated_many(self, items: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[ChunkKV]:
        """KV of each [sink][tokens] at positions 0.., keeping the tokens' part (not
        stored)."""
        return [run.entry() for run in self._compute_runs(
            [IsolatedCompute(None, tuple(t), tuple(sink), True) for t, sink in items])]

    def compute_isolated(self, token_ids, sink: tuple[int, ...] | None = None) -> ChunkKV:
        """KV of [sink][chunk] at positions 0.., keeping the chunk's part."""
        sink = self.sink_ids if sink is None else tuple(sink)
        return self.compute_isolated_many([(tuple(token_ids), sink)])[0]

    def deliver(self, job: Job, key, entry: ChunkKV) -> None:
        for seg in job.segments:
            if seg.entry is None and seg.key == key:
                seg.entry = entry

    # -- 3. load ----------------------------------------------------------------------------
    def load(self, job: Job) -> None:
        """Write the job's segments into its blocks and set up its selection; a method
        that reorders lays the chunks out by selected share first (one extra load and
        selection of its own)."""
        if job.method.reorders:
            self._reorder(job)
        self._load(job)

    def _load(self, job: Job) -> None:
        plan, result = job.plan, job.result
        device = self.adapter.device
        with _timed([job], "load"):
            # The prompt goes to the device once (device_ints: the host does not wait).
            job.ids = device_ints(plan.token_ids, device) if job.ratio > 0 else None
            loads, job.candidates = [], []
            for seg in job.segments:
                loads.append((seg.entry, seg.first - seg.start, seg.start, seg.first, seg.end))
                if seg.is_chunk:
                    result.tokens_reused += seg.end - seg.first
                else:
                    result.tokens_glue += seg.end - seg.first
                if not seg.exact:
                    job.candidates.append((seg.first, seg.end))
            if not self._write_chunks(loads, job.kv):
                result.kernel_fallbacks += 1
        num_candidates = sum(c1 - c0 for c0, c1 in job.candidates)
        result.candidate_tokens = num_candidates
        budget = budget_for(num_candidates, job.ratio)
        # Pure reuse selects nothing: no candidate tensor to build (32K positions).
        cand = _positions(job.candidates if budget else [], device)
        job.inp = SelectionInput(cand, job.candidates, budget, seed=self.config.seed)

    def needs_signals(self, job: Job) -> bool:
        inp = job.inp
        return bool(job.method.signals) and 0 < inp.budget < inp.candidates.numel()

    # -- 4. select ----------------------------------------------------------------------------
    def select_batch(self, jobs: list[Job]) -> None:
        """Signals for the jobs that need them (batched per signal), then each job's
        selection."""
        scoring = [j for j in jobs if self.needs_signals(j)]
        if scoring:
            with _timed(scoring, "score"):
                for job, signal in zip(scoring, compute_signals(self, scoring)):
                    job.inp.signal = signal
        for job in jobs:
            job.chosen = select(job.method.name, job.inp)
            job.result.tokens_recomputed = int(job.chosen.numel())
            if self.config.debug_selection:
                job.result.selected_positions = job.chosen.tolist()

    # -- 5. recompute -------------------------------------------------------------------------
    def recompute_slices(self, slices: list[tuple[Job, int, int]]) -> None:
        """Recompute chosen[start:end] of each job, in batched passes: replayed graphs of
        up to RECOMPUTE_BATCH requests where capture is on, else one eager pass over all. A
        job's selected tokens may come in several slices, in position order (exact: a
        token attends only to earlier positions, which earlier slices have written)."""
        slices = [(j, a, b) for j, a, b in slices if b > a]
        if not slices:
            return
        jobs = [j for j, _, _ in slices]
        for job in jobs:
            job.result.batched_with = max(job.result.batched_with, len(jobs) - 1)
        with _timed(jobs, "recompute"):
            graphs = self.pass_graphs_for(jobs[0].kv)
            if graphs is not None and graphs.capture:
                eager = []
                for i in range(0, len(slices), pass_graphs.RECOMPUTE_BATCH):
                    batch = slices[i:i + pass_graphs.RECOMPUTE_BATCH]
                    items = [PrefillItem(j.ids[j.chosen[a:b]], j.chosen[a:b], j.plan.context_end,
                                         j.kv.block_ids) for j, a, b in batch]
                    if not graphs.prefill_batch(items):
                        eager += batch
                slices = eager
            if slices:
                self.executor.prefill_groups([RowGroup(j.ids[j.chosen[a:b]], j.chosen[a:b], j.kv)
                                              for j, a, b in slices])

    def run(self, plan: LoadPlan, kv: PagedKV) -> LoadResult:
        """One request's whole load at once: every step above, nothing batched (tests,
        scripts; the worker goes through the work queue)."""
        job = self.new_job(plan, kv)
        self.run_whole(job, self.resolve(job))
        return job.result

    def run_whole(self, job: Job, missing: list[IsolatedCompute]) -> None:
        """A resolved job at once: its missing segments computed (one batched pass) and
        delivered, then its load, selection and whole recompute."""
        for task, entry in zip(missing, self.compute_isolated_batch(missing) if missing else []):
            self.deliver(job, task.key, entry)
        self.load(job)
        self.select_batch([job])
        self.recompute_slices([(job, 0, job.rows_left())])

    def _reorder(self, job: Job) -> None:
        """Information-flow chunk reordering: select once in the given order (the
        method's own signals), then lay the chunks out by ascending selected fraction,
        most relevant nearest the question. Glue tokens keep their places; vLLM never
        rereads the context's token ids, so the request runs on the reordered layout."""
        plan = job.plan
        if plan.ratio >= 1.0 or plan.load_start > 0 or len(plan.chunks) < 2:
            return  # exact limit / prefix hit: keep the order
        self._load(job)
        self.select_batch([job])
        chosen = job.chosen
        fractions = [int(((chosen >= c0) & (chosen < c1)).sum()) / (c1 - c0) for c0, c1 in plan.chunks]
        order = sorted(range(len(plan.chunks)), key=lambda i: (fractions[i], i))
        ids, spans = reordered_layout(plan.token_ids, plan.chunks, order)
        job.plan = replace(plan, token_ids=ids, chunks=spans)
        job.result.reorder = order
        # The new layout's segments: the same entries, at their new places.
        by_tokens = {seg.token_ids: seg.entry for seg in job.segments}
        s = len(self.sink_ids)
        exact_prefix = tuple(ids[:s]) == self.sink_ids
        job.segments = [Segment(c0, c1, is_chunk, None, tuple(ids[c0:c1]), (), (
            exact_prefix and c0 == s) if is_chunk else c0 == 0, c0, by_tokens[tuple(ids[c0:c1])])
            for c0, c1, is_chunk in context_segments(spans)]
        # Counts restart for the final layout; store traffic keeps the first lookups.
        job.result.tokens_reused = job.result.tokens_glue = 0
        job.result.chunks_exact = sum(seg.exact for seg in job.segments if seg.is_chunk)

    def captured_graphs(self) -> int:
        """How many pass graphs this worker holds (the isolated arena's included)."""
        held = len(self._graphs[1]._entries) if self._graphs else 0
        return held + (len(self._arena.graphs._entries) if self._arena else 0)

    # -- engine start ----------------------------------------------------------------------
    def warm_up(self, keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int,
                recompute_rows: int = 0, isolated_rows: int = 0) -> None:
        """Compile, at engine start, every Triton kernel specialization serving can launch
        (the kernels' varying arguments are not specialized on and their constexpr
        sizes are fixed, so one call of each variant covers every later shape): the
        chunk load read in place and gathered, the partial attention with and without key
        splits (and their merge), and both scoring kernels, through the passes that use
        them, on tiny inputs. Then, where capture is on, the recompute graphs of every
        row bucket up to recompute_rows (a step's blend budget: what a recompute pass
        under load holds) and the scoring graphs of questions of up to
        START_SCORE_QUESTION tokens, and, where it is on, the isolated arena with the graphs of
        its passes up to isolated_rows (a step's isolated budget). Everything is
        written into vLLM's null block (block 0, never read unmasked) or the arena's
        null page. No-op off the kernel path."""
        kv = PagedKV(keys, values, torch.zeros(64, dtype=torch.long, device=keys[0].device), block_size)
        if not (kv.strided and use_kernels(keys[0])):
            return
        device = keys[0].device
        shape = self.adapter.shape
        n = 3
        zeros = torch.zeros(self.adapter.num_layers, n, shape.num_kv_heads, shape.head_dim,
                            dtype=keys[0].dtype, device=device)
        entry = ChunkKV(tuple(range(n)), zeros, zeros.clone(), len(self.sink_ids))
        loads = [(entry, 0, 1, 1, 1 + n)]
        positions = _positions([(1, 1 + n)], device)
        delta = torch.ones(n, dtype=torch.long, device=device)
        cos_sin = self.cos_sin.to(device)
        ids = torch.zeros(4, dtype=torch.long, device=device)
        self._write_chunks(loads, kv)  # in place where the cache allows it
        self._write_gathered(loads, kv, positions, delta, cos_sin)
        # Isolated computes: buffers sharing one arena, the partial attention without
        # splits over it (dense_batch.py); and a private buffer (the oracle-kv
        # diagnostic's full prefill).
        self.compute_isolated_many([((1, 2), self.sink_ids), ((3,), ())])
        private = DenseKV.empty(self.adapter.num_layers, 3, shape.num_kv_heads, shape.head_dim,
                                keys[0].dtype, device)
        self.executor.prefill(ids[:3], torch.arange(3, device=device), private)
        graphs = self.pass_graphs_for(kv)
        # Scoring over a 2048-key bucket: the partial attention with splits and their
        # merge, the row-lse and column-norm kernels (context count on the device).
        from vllm_kvflow.blend.pass_graphs import ScoreItem

        graphs.score_batch([ScoreItem(ids, 40, 40, kv.block_ids)])
        graphs.prefill_batch([PrefillItem(ids, torch.arange(4, device=device), 40, kv.block_ids)])
        self.executor.prefill_groups([RowGroup(ids, torch.arange(4, device=device), kv)])
        graphs.capture_recompute(recompute_rows)
        graphs.capture_scoring(START_SCORE_QUESTION, pass_graphs.MAX_GRAPHS // 2)
        if isolated_arena.enabled():
            self._build_arena(graphs, isolated_rows, keys[0].dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _build_arena(self, graphs: PassGraphs, isolated_rows: int, dtype) -> None:
        """The isolated computes' arena and its graphs (blend/isolated_arena.py); where
        the device has no room left for it, the computes keep their own buffers."""
        shape = self.adapter.shape
        rows = arena_rows(isolated_rows)
        try:
            arena = IsolatedArena(self.executor, self.adapter.num_layers, rows, shape.num_kv_heads,
                                  shape.head_dim, dtype, self.adapter.device,
                                  capture=graphs.capture, pool_of=graphs)
        except torch.OutOfMemoryError:
            logger.warning("kvflow: no device memory for the isolated arena (%d rows); isolated "
                           "computes run eagerly", rows)
            return
        arena.capture(isolated_rows)
        self._arena = arena
        self.compute_isolated_many([((1, 2), self.sink_ids)])  # through the arena, as served

    # -- steps ----------------------------------------------------------------------------
    def _write_chunks(self, loads, kv: PagedKV) -> bool:
        """Write every segment's K (re-rotated) and V into the request's blocks.

        On the kernel path the kernel reads each segment where it lies (one launch for
        all layers and segments; host-tier entries are first copied to the device, at
        most _STAGE_BYTES at a time); CPU_ATTN pages take each segment rotated once for
        all layers, then one write per layer by vLLM's op. Elsewhere the segments are
        gathered for a group of layers at once and written by one fused call per group.
        False where the in-place path was possible but refused the load (the gather did
        it, slower)."""
        if not loads:
            return True
        device = self.adapter.device
        positions = _positions([(first, c1) for *_, first, c1 in loads], device)
        # A segment's tokens all move by the same distance: its start minus its local
        # start. Built on the host and copied once (not a kernel per segment).
        delta = device_ints(np.repeat([c0 - e.local_start for e, _, c0, _, _ in loads],
                                      [c1 - first for *_, first, c1 in loads]), device)
        cos_sin = self.cos_sin.to(device)
        if (kv.strided and use_kernels(positions)) or getattr(kv, "write_op", None) is not None:
            try:
                self._write_in_place(loads, kv, positions, delta, cos_sin)
                return True
            except ValueError as e:  # e.g. a non-contiguous entry: gather instead
                _warn_once("kernel-refused",
                           f"kvflow: the fused chunk-load kernel refused a load ({e}); gathering "
                           "instead, which is slower (counted as kernel_fallbacks)")
                self._write_gathered(loads, kv, positions, delta, cos_sin)
                return False
        self._write_gathered(loads, kv, positions, delta, cos_sin)
        return True

    def _write_in_place(self, loads, kv: PagedKV, positions, delta, cos_sin) -> None:
        device = positions.device
        segments, staged, t0, t1 = [], 0, 0, 0
        for entry, skip, _, first, c1 in loads:
            keys, values = entry.keys, entry.values
            if keys.device != device:  # host tier: one copy per entry, asynchronous
                keys, values = keys.to(device, non_blocking=True), values.to(device, non_blocking=True)
                staged += entry.nbytes
            segments.append((keys, values, skip, c1 - first))
            t1 += c1 - first
            if staged >= _STAGE_BYTES:
                kv.load_rotated_segments(segments, positions[t0:t1], delta[t0:t1], cos_sin,
                                         self.rotary_dim, self.is_neox)
                segments, staged, t0 = [], 0, t1
        if segments:
            kv.load_rotated_segments(segments, positions[t0:t1], delta[t0:t1], cos_sin,
                                     self.rotary_dim, self.is_neox)

    def _write_gathered(self, loads, kv: PagedKV, positions, delta, cos_sin) -> None:
        device = positions.device
        first = loads[0][0].keys
        per_layer = 2 * positions.numel() * first[0, :1].numel() * first.element_size()
        group = max(1, min(self.adapter.num_layers, _GATHER_BYTES // max(per_layer, 1)))
        for l0 in range(0, self.adapter.num_layers, group):
            l1 = min(l0 + group, self.adapter.num_layers)
            keys = torch.cat([e.keys[l0:l1, skip:].to(device, non_blocking=True) for e, skip, *_ in loads], 1)
            values = torch.cat([e.values[l0:l1, skip:].to(device, non_blocking=True) for e, skip, *_ in loads], 1)
            kv.load_rotated_layers(range(l0, l1), positions, keys, values, delta, cos_sin,
                                   self.rotary_dim, self.is_neox)

    def pass_graphs_for(self, kv) -> PassGraphs | None:
        """The in-place passes over this worker's paged cache (built once per cache),
        where the kernels can read it in place; their CUDA graphs where capture is on."""
        if not (getattr(kv, "strided", False) and use_kernels(kv.keys[0])):
            return None
        capture = capture_graphs(kv.keys[0].is_cuda)
        cache_id = (kv.keys[0].data_ptr(), capture)
        if self._graphs is None or self._graphs[0] != cache_id:
            self._graphs = (cache_id, PassGraphs(self.executor, kv.keys, kv.values, kv.block_size,
                                                 self.scoring_layers, capture=capture,
                                                 max_context=self.max_model_len))
        return self._graphs[1]

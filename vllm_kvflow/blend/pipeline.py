"""The worker's job for one request: fill its paged KV for [load_start, context_end).

1. chunk KV from the store (a miss computes the chunk in isolation behind the sink and
   stores it) and glue KV (the tokens around the chunks) from the glue cache, written
   into the request's blocks with keys re-rotated to the global positions (DESIGN §2
   steps 1-2);
2. for selectors that need a signal: score;
3. select ratio * T of the candidate tokens (every reused token whose KV is not exact
   already) and prefill them layer by layer over the mixed cache (steps 4-5).
The prompt's remaining tokens are then prefilled by vLLM itself over this cache.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vllm_kvflow.blend.executor import LayerwiseExecutor
from vllm_kvflow.blend.glue import GlueCache
from vllm_kvflow.blend import pass_graphs
from vllm_kvflow.blend.paged import DenseKV, PagedKV, use_kernels
from vllm_kvflow.blend.pass_graphs import PassGraphs
from vllm_kvflow.blend.selection import SELECTORS, SelectionInput, budget_for, select
from vllm_kvflow.config import KVFlowConfig, resolve_layers
from vllm_kvflow.patches.parallel import sum_over_tp
from vllm_kvflow.store import ChunkKV, ChunkStore, chunk_key


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
    reorder: list[int] | None = None  # infoflow-reorder: chunk order used
    selected_positions: list[int] | None = None  # recomputed positions, with debug_selection
    timer: _Timer | None = field(default=None, repr=False)  # -> timings_s in as_dict()

    def as_dict(self) -> dict:
        """The stats, with `timings_s` per phase (on CUDA this waits for the load's GPU
        work: call it after the step's forward is launched)."""
        out = {k: v for k, v in self.__dict__.items() if k != "timer"}
        out["timings_s"] = self.timer.resolve() if self.timer is not None else {}
        return out


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


def device_ints(values, device) -> torch.Tensor:
    """Host ints as a device int64 tensor, built through numpy: torch.tensor() on a
    Python list is ~6x slower (32K token ids: 7.8 ms against 1.3 ms on the CPU machine)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)


def _positions(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """The positions of sorted spans, concatenated: one host-built tensor, one copy."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    ranges = np.concatenate([np.arange(a, b) for a, b in spans])
    return torch.from_numpy(ranges).to(device, non_blocking=True)


class _Timer:
    """Wall time per phase of one load. On CUDA each phase is bracketed by two events,
    read only after the fact (resolve), so timing never makes the host wait for the GPU:
    vLLM launches the step's forward while the load's last kernels still run. A phase's
    time is then from where the GPU reached its start to where it finished its work."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self._mark()
        yield
        self.spans.append((name, start, self._mark()))

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


# Bytes of chunk K/V gathered at once when writing a request's chunks (torch path), and
# of host-tier entries staged on the device at once (kernel path).
_GATHER_BYTES = 1 << 30
_STAGE_BYTES = 1 << 30

logger = logging.getLogger("vllm_kvflow")


def capture_graphs(on_cuda: bool) -> bool:
    """Whether the in-place passes are captured in CUDA graphs: on CUDA unless
    KVFLOW_GRAPHS=0 (under tensor parallelism inside vLLM's graph_capture(), see
    pass_graphs)."""
    return on_cuda and pass_graphs.enabled()


class BlendPipeline:
    """Per-worker: executor + store + settings. One instance per worker process."""

    def __init__(self, executor: LayerwiseExecutor, store: ChunkStore, config: KVFlowConfig,
                 model_id: str, sink_ids: tuple[int, ...]):
        self.executor = executor
        self.adapter = executor.adapter
        self.store = store
        self.config = config
        self.model_id = model_id
        self.sink_ids = tuple(sink_ids)
        self.glue = GlueCache()
        self._graphs: tuple[tuple, PassGraphs] | None = None
        self.scoring_layers = resolve_layers(config.scoring_layers, self.adapter.num_layers)
        cache, self.rotary_dim, self.is_neox = self.adapter.rope_cache()
        self.cos_sin = cache.float()

    # -- store --------------------------------------------------------------------------
    def chunk_kv(self, token_ids: list[int], namespace: str, result: LoadResult) -> ChunkKV:
        key = chunk_key(self.model_id, namespace, self.sink_ids, token_ids)
        entry = self.store.get(key, token_ids)
        if entry is not None:
            result.chunks_hit += 1
            return entry
        result.chunks_missed += 1
        entry = self.compute_isolated(token_ids)
        self.store.put(key, entry)
        return entry

    def glue_kv(self, token_ids: list[int], namespace: str, at_start: bool) -> ChunkKV:
        """Glue KV: at the prompt's start computed with nothing before it (exact),
        elsewhere behind the sink like a chunk. Per namespace, like chunks, so one
        tenant's cache hits (timing) say nothing about another's system prompt."""
        key = (namespace, at_start, tuple(token_ids))
        entry = self.glue.get(key)
        if entry is None:
            entry = self.compute_isolated(token_ids, sink=() if at_start else None)
            self.glue.put(key, entry)
        return entry

    def compute_isolated(self, token_ids: list[int], sink: tuple[int, ...] | None = None) -> ChunkKV:
        """KV of [sink][chunk] at positions 0.., keeping the chunk's part."""
        sink = self.sink_ids if sink is None else sink
        ids = torch.tensor(sink + tuple(token_ids), device=self.adapter.device)
        n, s = ids.numel(), len(sink)
        shape = self.adapter.shape
        dtype = next(self.adapter.model.parameters()).dtype
        buf = DenseKV.empty(self.adapter.num_layers, n, shape.num_kv_heads, shape.head_dim,
                            dtype, ids.device)
        self.executor.prefill(ids, torch.arange(n, device=ids.device), buf)
        return ChunkKV(tuple(int(t) for t in token_ids), buf.keys[:, s:].clone(),
                       buf.values[:, s:].clone(), local_start=s)

    # -- the request ----------------------------------------------------------------------
    def run(self, plan: LoadPlan, kv: PagedKV) -> LoadResult:
        timer = _Timer(self.adapter.device)
        result = LoadResult(timer=timer)
        if plan.method == "infoflow-reorder":
            plan = self._reorder(plan, kv, result, timer)
        ids, chosen = self._select(plan, kv, result, timer)
        with timer("recompute"):
            self._prefill(ids, chosen, plan.context_end, kv)
        result.tokens_recomputed = int(chosen.numel())
        if self.config.debug_selection:
            result.selected_positions = chosen.tolist()
        return result

    def _select(self, plan: LoadPlan, kv: PagedKV, result: LoadResult,
                timer) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Load chunks and glue, score if the selector needs a signal, and return the
        prompt's token ids on the device (None for pure reuse, which computes nothing)
        and the positions to recompute (sorted)."""
        device = self.adapter.device
        prompt = plan.token_ids
        start = plan.load_start
        s = len(self.sink_ids)
        exact_prefix = tuple(prompt[:s]) == self.sink_ids
        ratio = 0.0 if plan.method == "none" else plan.ratio

        candidates, loads = [], []  # candidate spans; (entry, skip, c0, first, c1)
        with timer("load"):
            # The prompt goes to the device once, before this load queues GPU work: a
            # plain copy from the host waits for the stream, which costs nothing now
            # but, after the load, would stall the host until load and score end.
            ids = device_ints(prompt, device) if ratio > 0 else None
            for c0, c1, is_chunk in context_segments(plan.chunks):
                if c1 <= start:
                    continue  # wholly inside the local prefix-cache hit
                if is_chunk:
                    entry = self.chunk_kv(prompt[c0:c1], plan.namespace, result)
                    # Same tokens before it as in isolation, same positions: exact KV.
                    exact = exact_prefix and c0 == s
                    result.chunks_exact += exact
                else:
                    entry = self.glue_kv(prompt[c0:c1], plan.namespace, at_start=c0 == 0)
                    exact = c0 == 0
                first = max(c0, start)
                loads.append((entry, first - c0, c0, first, c1))
                if is_chunk:
                    result.tokens_reused += c1 - first
                else:
                    result.tokens_glue += c1 - first
                if not exact:
                    candidates.append((first, c1))
            self._write_chunks(loads, kv)

        num_candidates = sum(c1 - c0 for c0, c1 in candidates)
        result.candidate_tokens = num_candidates
        budget = budget_for(num_candidates, ratio)
        # Pure reuse selects nothing: no candidate tensor to build (32K positions).
        cand = _positions(candidates if budget else [], device)
        inp = SelectionInput(cand, candidates, budget, seed=self.config.seed)
        selector = SELECTORS.get(plan.method)
        if 0 < inp.budget < cand.numel() and selector is not None and selector.needs_signal:
            with timer("score"):
                inp.signal = self._signal(selector.needs_signal, plan, ids, kv)
        return ids, select(plan.method, inp)

    def _reorder(self, plan: LoadPlan, kv: PagedKV, result: LoadResult, timer) -> LoadPlan:
        """Information-flow chunk reordering (DESIGN §2 step 6): score once in the given
        order, then lay the chunks out by ascending selected fraction (most relevant
        nearest the question). Glue tokens keep their places; vLLM never rereads the
        context's token ids, so the request then runs on the reordered layout."""
        if plan.ratio >= 1.0 or plan.load_start > 0 or len(plan.chunks) < 2:
            return replace(plan, method="infoflow")  # exact limit / prefix hit: keep order
        _, chosen = self._select(replace(plan, method="infoflow"), kv, result, timer)
        fractions = [int(((chosen >= c0) & (chosen < c1)).sum()) / (c1 - c0) for c0, c1 in plan.chunks]
        order = sorted(range(len(plan.chunks)), key=lambda i: (fractions[i], i))
        ids, spans = reordered_layout(plan.token_ids, plan.chunks, order)
        result.reorder = order
        # Counts restart for the final layout; store traffic keeps both passes' counts.
        result.tokens_reused = result.tokens_glue = result.chunks_exact = 0
        return replace(plan, token_ids=ids, chunks=spans, method="infoflow")

    # -- steps ----------------------------------------------------------------------------
    def _write_chunks(self, loads, kv: PagedKV) -> None:
        """Write every segment's K (re-rotated) and V into the request's blocks.

        On the kernel path the kernel reads each segment where it lies (one launch for
        all layers and segments; host-tier entries are first copied to the device, at
        most _STAGE_BYTES at a time). Elsewhere the segments are gathered for a group of
        layers at once and written by one fused call per group."""
        if not loads:
            return
        device = self.adapter.device
        positions = _positions([(first, c1) for *_, first, c1 in loads], device)
        # A segment's tokens all move by the same distance: its start minus its local
        # start. Built on the host and copied once (not a kernel per segment).
        delta = torch.tensor(np.repeat([c0 - e.local_start for e, _, c0, _, _ in loads],
                                       [c1 - first for *_, first, c1 in loads]),
                             dtype=torch.long).to(device, non_blocking=True)
        cos_sin = self.cos_sin.to(device)
        if kv.strided and use_kernels(positions):
            try:
                self._write_in_place(loads, kv, positions, delta, cos_sin)
                return
            except ValueError as e:  # e.g. a non-contiguous entry: gather instead
                logger.debug("kvflow: segment load not possible (%s); gathering", e)
        self._write_gathered(loads, kv, positions, delta, cos_sin)

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

    def _prefill(self, prompt_ids: torch.Tensor | None, positions: torch.Tensor,
                 context_end: int, kv) -> None:
        """Recompute the tokens at `positions` of the prompt (device ids; None only when
        there is nothing to recompute)."""
        if positions.numel() == 0:
            return
        ids = prompt_ids[positions]
        graphs = self._pass_graphs(kv)
        if graphs is not None and graphs.capture and graphs.prefill(
                ids, positions, context_end, kv.block_ids):
            return
        self.executor.prefill(ids, positions, kv)

    def _signal(self, kind: str, plan: LoadPlan, prompt_ids: torch.Tensor, kv: PagedKV):
        if "+" in kind:
            # k_deviation first when both: it rewrites layers 0-1, which scoring then reads.
            kinds = kind.split("+")
            order = sorted(kinds, key=lambda k: k != "k_deviation")
            got = {k: self._signal(k, plan, prompt_ids, kv) for k in order}
            return tuple(got[k] for k in kinds)
        if kind == "k_deviation":
            # Layers 0 and 1 of every token from load_start on are recomputed here
            # (CacheBlend's first layers); the deviation is read at layer 1.
            positions = torch.arange(plan.load_start, plan.context_end, device=self.adapter.device)
            ids = prompt_ids[plan.load_start:plan.context_end]
            dev = self.executor.key_deviation(ids, positions, kv, layer=1)
            signal = torch.zeros(plan.context_end, device=positions.device)
            signal[positions] = dev.square()  # squares sum over tensor-parallel ranks
            return sum_over_tp(signal).sqrt()
        if kind == "exact_kv_deviation":
            return self._exact_kv_deviation(plan, prompt_ids, kv)
        if kind == "attn_norm":
            q0, q1 = plan.question
            ids = prompt_ids[q0:q1]
            graphs = self._pass_graphs(kv)
            if graphs is not None:  # in place in the request's cache
                return sum_over_tp(graphs.score(ids, q0, plan.context_end, kv.block_ids))
            positions = torch.arange(q0, q1, device=self.adapter.device)
            return sum_over_tp(self.executor.score(ids, positions, kv, plan.context_end,
                                                   self.scoring_layers))
        raise NotImplementedError(f"signal {kind!r}")

    def _pass_graphs(self, kv) -> PassGraphs | None:
        """The in-place passes over this worker's paged cache (built once per cache),
        where the kernels can read it in place; their CUDA graphs where capture is on."""
        if not (getattr(kv, "strided", False) and use_kernels(kv.keys[0])):
            return None
        capture = capture_graphs(kv.keys[0].is_cuda)
        cache_id = (kv.keys[0].data_ptr(), capture)
        if self._graphs is None or self._graphs[0] != cache_id:
            self._graphs = (cache_id, PassGraphs(self.executor, kv.keys, kv.values, kv.block_size,
                                                 self.scoring_layers, capture=capture))
        return self._graphs[1]

    def _exact_kv_deviation(self, plan: LoadPlan, prompt_ids: torch.Tensor,
                            kv: PagedKV) -> torch.Tensor:
        """Per position: sum over layers of ||K - K_exact||^2 + ||V - V_exact||^2, the
        reused cache against a full prefill of the context (the oracle-kv diagnostic)."""
        end = plan.context_end
        device = self.adapter.device
        positions = torch.arange(end, device=device)
        shape = self.adapter.shape
        dtype = next(self.adapter.model.parameters()).dtype
        exact = DenseKV.empty(self.adapter.num_layers, end, shape.num_kv_heads, shape.head_dim,
                              dtype, device)
        self.executor.prefill(prompt_ids[:end], positions, exact)
        dev = torch.zeros(end, dtype=torch.float32, device=device)
        for layer in range(self.adapter.num_layers):
            k, v = kv.read(layer, end)
            dev += (k.float() - exact.keys[layer].float()).flatten(1).square().sum(1)
            dev += (v.float() - exact.values[layer].float()).flatten(1).square().sum(1)
        return sum_over_tp(dev)


"""The worker's job for one request: fill its paged KV for [load_start, context_end).

1. chunk KV from the store (a miss computes the chunk in isolation behind the sink and
   stores it), written into the request's blocks with keys re-rotated to the global
   positions (DESIGN §2 steps 1-2);
2. for selectors that need a signal: prefill the glue tokens (prompt tokens outside
   chunks), then score;
3. select ratio * T chunk tokens and prefill them together with the glue tokens after
   the first selected one, layer by layer over the mixed cache (steps 4-5).
The prompt's remaining tokens are then prefilled by vLLM itself over this cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from vllm_kvflow.blend.executor import LayerwiseExecutor
from vllm_kvflow.blend.paged import DenseKV, PagedKV
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
    tokens_recomputed: int = 0  # chunk tokens recomputed over the mixed cache
    tokens_glue: int = 0  # prompt tokens outside chunks, prefilled by the executor
    reorder: list[int] | None = None  # infoflow-reorder: chunk order used
    timings_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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


class _Timer:
    def __init__(self, out: dict[str, float], device: torch.device):
        self.out, self.device = out, device

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                timer.out[name] = timer.out.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()


# Bytes of chunk K/V gathered at once when writing a request's chunks.
_GATHER_BYTES = 1 << 30


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

    def compute_isolated(self, token_ids: list[int]) -> ChunkKV:
        """KV of [sink][chunk] at positions 0.., keeping the chunk's part."""
        ids = torch.tensor(self.sink_ids + tuple(token_ids), device=self.adapter.device)
        n, s = ids.numel(), len(self.sink_ids)
        shape = self.adapter.shape
        dtype = next(self.adapter.model.parameters()).dtype
        buf = DenseKV.empty(self.adapter.num_layers, n, shape.num_kv_heads, shape.head_dim,
                            dtype, ids.device)
        self.executor.prefill(ids, torch.arange(n, device=ids.device), buf)
        return ChunkKV(tuple(int(t) for t in token_ids), buf.keys[:, s:].clone(),
                       buf.values[:, s:].clone(), local_start=s)

    # -- the request ----------------------------------------------------------------------
    def run(self, plan: LoadPlan, kv: PagedKV) -> LoadResult:
        result = LoadResult()
        timer = _Timer(result.timings_s, self.adapter.device)
        if plan.method == "infoflow-reorder":
            plan = self._reorder(plan, kv, result, timer)
        chosen, glue, glue_done = self._select(plan, kv, result, timer)
        with timer("recompute"):
            if chosen.numel():
                # Glue tokens after the first recomputed token saw stale KV: redo them.
                later_glue = glue[glue > chosen[0]] if glue_done else glue
                todo = torch.sort(torch.cat([chosen, later_glue])).values
                self._prefill(plan.token_ids, todo, kv)
            elif not glue_done:
                self._prefill(plan.token_ids, glue, kv)
        result.tokens_recomputed = int(chosen.numel())
        result.tokens_glue = int(glue.numel())
        return result

    def _select(self, plan: LoadPlan, kv: PagedKV, result: LoadResult, timer):
        """Load the chunks, and (for signal-based selectors) prefill glue and score.
        Returns (chosen positions, glue positions, whether the glue is prefilled)."""
        device = self.adapter.device
        prompt = plan.token_ids
        start, ctx_end = plan.load_start, plan.context_end
        s = len(self.sink_ids)
        exact_prefix = tuple(prompt[:s]) == self.sink_ids

        candidates, cand_chunks, loads = [], [], []
        with timer("load"):
            for c0, c1 in plan.chunks:
                if c1 <= start:
                    continue  # wholly inside the local prefix-cache hit
                entry = self.chunk_kv(prompt[c0:c1], plan.namespace, result)
                first = max(c0, start)
                positions = torch.arange(first, c1, device=device)
                loads.append((entry, first - c0, c0, positions))
                result.tokens_reused += c1 - first
                if exact_prefix and c0 == s:
                    # Same tokens before it as in isolation, same positions: exact KV.
                    result.chunks_exact += 1
                    continue
                candidates.append(positions)
                cand_chunks.append((first, c1))
            self._write_chunks(loads, kv)

        in_chunk = torch.zeros(ctx_end, dtype=torch.bool, device=device)
        for c0, c1 in plan.chunks:
            in_chunk[c0:c1] = True
        glue = torch.nonzero(~in_chunk[start:ctx_end]).flatten() + start
        cand = torch.cat(candidates) if candidates else glue[:0]
        ratio = 0.0 if plan.method == "none" else plan.ratio
        inp = SelectionInput(cand, cand_chunks, budget_for(cand.numel(), ratio),
                             seed=self.config.seed)

        selector = SELECTORS.get(plan.method)
        glue_done = False
        if 0 < inp.budget < cand.numel() and selector is not None and selector.needs_signal:
            with timer("glue"):
                self._prefill(prompt, glue, kv)
            glue_done = True
            with timer("score"):
                inp.signal = self._signal(selector.needs_signal, plan, kv)
        return select(plan.method, inp), glue, glue_done

    def _reorder(self, plan: LoadPlan, kv: PagedKV, result: LoadResult, timer) -> LoadPlan:
        """Information-flow chunk reordering (DESIGN §2 step 6): score once in the given
        order, then lay the chunks out by ascending selected fraction (most relevant
        nearest the question). Glue tokens keep their places; vLLM never rereads the
        context's token ids, so the request then runs on the reordered layout."""
        if plan.ratio >= 1.0 or plan.load_start > 0 or len(plan.chunks) < 2:
            return replace(plan, method="infoflow")  # exact limit / prefix hit: keep order
        chosen, _, _ = self._select(replace(plan, method="infoflow"), kv, result, timer)
        fractions = [int(((chosen >= c0) & (chosen < c1)).sum()) / (c1 - c0) for c0, c1 in plan.chunks]
        order = sorted(range(len(plan.chunks)), key=lambda i: (fractions[i], i))
        ids, spans = reordered_layout(plan.token_ids, plan.chunks, order)
        result.reorder = order
        # Counts restart for the final layout; store traffic keeps both passes' counts.
        result.tokens_reused = result.chunks_exact = 0
        return replace(plan, token_ids=ids, chunks=spans, method="infoflow")

    # -- steps ----------------------------------------------------------------------------
    def _write_chunks(self, loads, kv: PagedKV) -> None:
        """Write every chunk's K (re-rotated) and V, one fused kernel per layer for all
        chunks of the request. The chunks are gathered for a group of layers at once
        (one copy per chunk, not per chunk and layer: long contexts have hundreds)."""
        if not loads:
            return
        device = loads[0][3].device
        positions = torch.cat([p for *_, p in loads])
        # A chunk's tokens all move by the same distance: its start minus its local start.
        delta = torch.cat([torch.full((p.numel(),), c0 - e.local_start, device=device)
                           for e, _, c0, p in loads])
        cos_sin = self.cos_sin.to(device)
        first = loads[0][0].keys
        per_layer = 2 * positions.numel() * first[0, :1].numel() * first.element_size()
        group = max(1, min(self.adapter.num_layers, _GATHER_BYTES // max(per_layer, 1)))
        for l0 in range(0, self.adapter.num_layers, group):
            l1 = min(l0 + group, self.adapter.num_layers)
            keys = torch.cat([e.keys[l0:l1, skip:].to(device, non_blocking=True) for e, skip, *_ in loads], 1)
            values = torch.cat([e.values[l0:l1, skip:].to(device, non_blocking=True) for e, skip, *_ in loads], 1)
            for i, layer in enumerate(range(l0, l1)):
                kv.load_rotated(layer, positions, keys[i], values[i], delta, cos_sin,
                                self.rotary_dim, self.is_neox)

    def _prefill(self, prompt: list[int], positions: torch.Tensor, kv) -> None:
        if positions.numel() == 0:
            return
        ids = torch.tensor(prompt, device=positions.device)[positions]
        self.executor.prefill(ids, positions, kv)

    def _signal(self, kind: str, plan: LoadPlan, kv: PagedKV) -> torch.Tensor:
        if kind == "k_deviation":
            # Layers 0 and 1 of every token from load_start on are recomputed here
            # (CacheBlend's first layers); the deviation is read at layer 1.
            positions = torch.arange(plan.load_start, plan.context_end, device=self.adapter.device)
            ids = torch.tensor(plan.token_ids, device=positions.device)[positions]
            dev = self.executor.key_deviation(ids, positions, kv, layer=1)
            signal = torch.zeros(plan.context_end, device=positions.device)
            signal[positions] = dev.square()  # squares sum over tensor-parallel ranks
            return sum_over_tp(signal).sqrt()
        if kind == "attn_norm":
            q0, q1 = plan.question
            positions = torch.arange(q0, q1, device=self.adapter.device)
            ids = torch.tensor(plan.token_ids[q0:q1], device=positions.device)
            return sum_over_tp(self.executor.score(ids, positions, kv, plan.context_end,
                                                   self.scoring_layers))
        raise NotImplementedError(f"signal {kind!r}")

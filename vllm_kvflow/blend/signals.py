"""The selection signals: per-position scores over a request's context that cost model
compute, one registered function each. A method names the signals it needs
(blend/selection.py); the pipeline computes exactly those, for all the jobs of a step
that need each one.

Every signal is summed over the tensor-parallel group (patches/parallel.py): each rank
holds only its own KV heads, and all ranks must select the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from vllm_kvflow.blend.executor import RowGroup
from vllm_kvflow.blend.paged import DenseKV
from vllm_kvflow.patches.parallel import sum_over_tp

if TYPE_CHECKING:
    from vllm_kvflow.blend.pipeline import BlendPipeline, Job

SignalFn = Callable[["BlendPipeline", "list[Job]"], "list[torch.Tensor]"]


@dataclass(frozen=True)
class Signal:
    """compute(pipeline, jobs): one [context_end] float tensor per job. rows(job,
    num_layers): what it costs, in rows through every layer (the unit of the worker's
    step budget). rewrites_cache: it writes recomputed KV into the request's cache, so
    it runs before signals that read the cache."""

    compute: SignalFn
    rows: Callable[["Job", int], float]
    rewrites_cache: bool = False


SIGNALS: dict[str, Signal] = {}


def register(name: str, rows: Callable[["Job", int], float], rewrites_cache: bool = False):
    def deco(fn: SignalFn) -> SignalFn:
        SIGNALS[name] = Signal(fn, rows, rewrites_cache)
        return fn

    return deco


def _signal(name: str) -> Signal:
    if name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}; known: {sorted(SIGNALS)}")
    return SIGNALS[name]


def signal_rows(job: "Job", num_layers: int) -> float:
    """What a job's signals cost, in rows through every layer."""
    return sum(_signal(name).rows(job, num_layers) for name in job.method.signals)


def compute_signals(pipeline: "BlendPipeline", jobs: "list[Job]") -> list:
    """Each job's signal(s), in the order its method names them: a tensor for one
    signal, a tuple for several."""
    names = sorted({n for j in jobs for n in j.method.signals},
                   key=lambda n: not _signal(n).rewrites_cache)
    got: dict[str, dict[int, torch.Tensor]] = {}
    for name in names:
        users = [j for j in jobs if name in j.method.signals]
        got[name] = {id(j): s for j, s in zip(users, _signal(name).compute(pipeline, users))}
    out = []
    for job in jobs:
        signals = tuple(got[n][id(job)] for n in job.method.signals)
        out.append(signals[0] if len(signals) == 1 else signals)
    return out


def _question_rows(job: "Job", num_layers: int) -> float:
    return 0.75 * (job.plan.question[1] - job.plan.question[0])  # through ~3/4 of the layers


@register("attn_norm", rows=_question_rows)
def attention_norm(pipeline: "BlendPipeline", jobs: "list[Job]") -> list[torch.Tensor]:
    """InfoFlow KV's signal: the L2 norm over the question's rows of its head-averaged
    attention to each context column, averaged over the scoring layers. Requests
    on the kernel path score in place in their paged caches, batched (CUDA graphs on
    GPU); elsewhere in one batched pass over gathered keys."""
    graphs = pipeline.pass_graphs_for(jobs[0].kv)
    if graphs is not None:
        from vllm_kvflow.blend.pass_graphs import ScoreItem

        items = [ScoreItem(j.ids[j.plan.question[0]:j.plan.question[1]], j.plan.question[0],
                           j.plan.context_end, j.kv.block_ids) for j in jobs]
        return [sum_over_tp(s) for s in graphs.score_batch(items)]
    device = pipeline.adapter.device
    groups = [RowGroup(j.ids[j.plan.question[0]:j.plan.question[1]],
                       torch.arange(*j.plan.question, device=device), j.kv,
                       length=j.plan.question[1]) for j in jobs]
    scores = pipeline.executor.score_groups(groups, [j.plan.context_end for j in jobs],
                                            pipeline.scoring_layers)
    return [sum_over_tp(s) for s in scores]


@register("k_deviation", rows=lambda job, num_layers: 2 / num_layers * (
    job.plan.context_end - job.plan.load_start), rewrites_cache=True)
def key_deviation(pipeline: "BlendPipeline", jobs: "list[Job]") -> list[torch.Tensor]:
    """CacheBlend's signal: layer 0 of every token from load_start on is recomputed
    (and written into the cache), then each token's layer-1 key is computed from it and
    scored by its distance from the cached one (layer 1 is not written)."""
    out = []
    for job in jobs:
        plan = job.plan
        positions = torch.arange(plan.load_start, plan.context_end, device=pipeline.adapter.device)
        dev = pipeline.executor.key_deviation(job.ids[plan.load_start:plan.context_end], positions,
                                              job.kv, layer=1, length=plan.context_end)
        signal = torch.zeros(plan.context_end, device=positions.device)
        signal[positions] = dev.square()  # squares sum over tensor-parallel ranks
        out.append(sum_over_tp(signal).sqrt())
    return out


@register("exact_kv_deviation", rows=lambda job, num_layers: job.plan.context_end)
def exact_kv_deviation(pipeline: "BlendPipeline", jobs: "list[Job]") -> list[torch.Tensor]:
    """The oracle-kv diagnostic's signal: per position, the sum over layers of
    ||K - K_exact||^2 + ||V - V_exact||^2 of the reused cache against a full prefill of
    the context, which it computes first."""
    out = []
    adapter = pipeline.adapter
    for job in jobs:
        end = job.plan.context_end
        positions = torch.arange(end, device=adapter.device)
        shape = adapter.shape
        dtype = next(adapter.model.parameters()).dtype
        exact = DenseKV.empty(adapter.num_layers, end, shape.num_kv_heads, shape.head_dim,
                              dtype, adapter.device)
        pipeline.executor.prefill(job.ids[:end], positions, exact)
        dev = torch.zeros(end, dtype=torch.float32, device=adapter.device)
        for layer in range(adapter.num_layers):
            k, v = job.kv.read(layer, end)
            dev += (k.float() - exact.keys[layer].float()).flatten(1).square().sum(1)
            dev += (v.float() - exact.values[layer].float()).flatten(1).square().sum(1)
        out.append(sum_over_tp(dev))
    return out


"""Tensor parallelism: every rank must pick the same tokens to recompute.

Each rank holds only its own KV heads, so signals computed from attention (infoflow's
attention norm, CacheBlend's key deviation) differ between ranks, and ranks that
recompute different tokens would call the layers' collectives with different shapes
and hang. Summing the per-rank signals over the tensor-parallel group gives all ranks
one signal (for the attention norm: the sum of per-rank head-group norms, which bounds
the all-head norm; for key deviation: summed squares give the all-head norm exactly).
"""
from __future__ import annotations

import contextlib

import torch


def tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - no distributed state (tests, single process)
        return 1


def sum_over_tp(signal: torch.Tensor) -> torch.Tensor:
    if tp_world_size() == 1:
        return signal
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(signal.contiguous())


def all_ranks(flags: list[bool]) -> list[bool]:
    """flags[i] true on every tensor-parallel rank. Each rank keeps its own chunk store;
    one whose store holds a chunk another rank lacks must compute it too, or the ranks
    would run different passes (and hang in their collectives)."""
    if tp_world_size() == 1 or not flags:
        return flags
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    t = torch.tensor(flags, dtype=torch.int32, device=group.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group.device_group)
    return [bool(x) for x in t.tolist()]


@contextlib.contextmanager
def graph_capture_stream(device: torch.device):
    """The stream to capture a CUDA graph of model layers on. Under tensor parallelism
    the capture runs inside vLLM's graph_capture(): its custom all-reduce then records
    the graph's buffers and registers them with the other ranks on exit (a collective:
    every rank must capture the same graphs in the same order, which holds because all
    ranks select the same tokens). Outside it, a captured all-reduce reads unregistered
    memory (illegal access, TP 2 on an H200). On one rank, a stream of kvflow's own
    (blend/private_stream.py: a pooled stream may be the one vLLM captured on, and the
    graph would share its cuBLAS workspace)."""
    if tp_world_size() == 1:
        from vllm_kvflow.blend.private_stream import private_stream

        yield private_stream(device, "capture", fallback_priority=-1)
        return
    from vllm.distributed.parallel_state import graph_capture

    with graph_capture(device) as context:
        yield context.stream

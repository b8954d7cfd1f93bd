"""Tensor parallelism: every rank must pick the same tokens to recompute.

Each rank holds only its own KV heads, so signals computed from attention (infoflow's
attention norm, CacheBlend's key deviation) differ between ranks, and ranks that
recompute different tokens would call the layers' collectives with different shapes
and hang. Summing the per-rank signals over the tensor-parallel group gives all ranks
one signal (for the attention norm: the sum of per-rank head-group norms, which bounds
the all-head norm; for key deviation: summed squares give the all-head norm exactly).
"""
from __future__ import annotations

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

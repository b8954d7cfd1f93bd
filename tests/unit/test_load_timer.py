"""Per-phase load timings (blend/pipeline.py _Timer): summed per phase, read after the
fact. On CUDA they come from events, so timing never makes the host wait for the GPU
(tests/gpu/test_pass_graphs_gpu.py checks that part)."""
import time

import torch

from vllm_kvflow.blend.pipeline import LoadResult, _Timer


def test_load_timings_are_summed_per_phase_and_read_after_the_fact():
    timer = _Timer(torch.device("cpu"))
    result = LoadResult(timer=timer)
    for _ in range(2):
        with timer("load"):
            time.sleep(0.01)
    with timer("recompute"):
        pass
    stats = result.as_dict()
    assert "timer" not in stats and set(stats["timings_s"]) == {"load", "recompute"}
    assert 0.02 <= stats["timings_s"]["load"] < 1.0
    assert LoadResult().as_dict()["timings_s"] == {}


def test_gpu_timed_stats_of_an_asynchronous_load_go_one_step_later():
    """On GPU an asynchronous load's stats leave the worker one step after the load
    finished (reading its CUDA-event timings at once would make the host wait for its GPU
    work); a synchronous load's (its forward is this very step's), a CPU load's and an
    error's go at once; nothing is lost or sent twice."""
    import types

    import pytest

    pytest.importorskip("vllm")
    from vllm_kvflow.blend.work_queue import Finished
    from vllm_kvflow.connector.worker import KVFlowWorker

    def finished(sync: bool, on_cuda: bool) -> Finished:
        timer = _Timer(torch.device("cpu"))
        timer.on_cuda = on_cuda  # no span recorded: reading it never touches CUDA
        job = types.SimpleNamespace(plan=types.SimpleNamespace(sync=sync),
                                    result=LoadResult(chunks_hit=1, timer=timer))
        return Finished(job)

    worker = object.__new__(KVFlowWorker)
    worker._results, worker._held = {}, {}
    extra = {"load_s": 0.0}
    worker._results = {"gpu-async": (finished(False, True), extra),
                       "gpu-sync": (finished(True, True), extra),
                       "cpu-async": (finished(False, False), extra),
                       "refused": ({"error": "x", "fallback": "y"}, extra)}
    first = worker.build_worker_meta().results
    assert set(first) == {"gpu-sync", "cpu-async", "refused"}
    worker._results = {"later": (finished(True, True), extra)}
    second = worker.build_worker_meta().results
    assert set(second) == {"gpu-async", "later"} and second["gpu-async"]["chunks_hit"] == 1
    assert worker.build_worker_meta() is None

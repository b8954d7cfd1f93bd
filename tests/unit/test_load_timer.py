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


def test_stats_of_an_asynchronous_load_go_one_step_later():
    """An asynchronous load's stats leave the worker one step after the load finished (on
    GPU, reading its CUDA-event timings at once would make the host wait for its GPU
    work; every device does the same); a synchronous load's (its forward is this very
    step's) and a failure's or refusal's (recorded as a dict) go at once; nothing is lost or sent twice."""
    import types

    import pytest

    pytest.importorskip("vllm")
    from vllm_kvflow.blend.work_queue import Finished
    from vllm_kvflow.connector.worker import KVFlowWorker

    def finished(sync: bool) -> Finished:
        job = types.SimpleNamespace(plan=types.SimpleNamespace(sync=sync),
                                    result=LoadResult(chunks_hit=1, timer=_Timer(torch.device("cpu"))))
        return Finished(job)

    worker = object.__new__(KVFlowWorker)
    worker._results, worker._held = {}, {}
    extra = {"load_s": 0.0}
    worker._results = {"async": (finished(False), extra),
                       "sync": (finished(True), extra),
                       "refused": ({"error": "x", "fallback": "y"}, extra)}
    first = worker.build_worker_meta().results
    assert set(first) == {"sync", "refused"}
    worker._results = {"later": (finished(True), extra)}
    second = worker.build_worker_meta().results
    assert set(second) == {"async", "later"} and second["async"]["chunks_hit"] == 1
    assert worker.build_worker_meta() is None

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

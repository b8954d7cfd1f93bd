"""The step log's allocator counters on a real GPU (blend/step_log.py): a fresh device
allocation the caching allocator cannot serve from its cache is one cudaMalloc."""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_allocator_calls_are_counted():
    from vllm_kvflow.blend.step_log import device_calls_of

    read = device_calls_of("cuda")
    mallocs, frees = read()
    held = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")  # 3 GiB: a new segment
    assert read()[0] == mallocs + 1
    del held
    torch.cuda.empty_cache()
    assert read()[1] >= frees + 1

"""patches/forward_priority.py: when vLLM's worker stream is lifted above the blend
stream (blend_stream "background"), and that the lift happens once, right after the
worker's own init_device. The stream itself is checked on a GPU
(tests/gpu/test_side_stream_gpu.py)."""
import types

import pytest

from vllm_kvflow.patches import forward_priority


def _engine(blend_stream="background", device="cuda", tp=1, connector="KVFlowConnector"):
    extra = {} if blend_stream is None else {"blend_stream": blend_stream}
    return types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_connector=connector,
                                                 kv_connector_extra_config=extra),
        device_config=types.SimpleNamespace(device_type=device),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp))


def test_only_background_blend_work_on_one_gpu_rank_lifts_the_stream():
    assert forward_priority.wanted(_engine())
    assert not forward_priority.wanted(_engine("side"))
    assert not forward_priority.wanted(_engine("main"))
    assert not forward_priority.wanted(_engine(None))
    assert not forward_priority.wanted(_engine(device="cpu"))
    assert not forward_priority.wanted(_engine(tp=2))
    assert not forward_priority.wanted(_engine(connector="OtherConnector"))
    assert not forward_priority.wanted(types.SimpleNamespace(kv_transfer_config=None))


@pytest.mark.parametrize("blend_stream,lifted", [("background", True), ("side", False)])
def test_init_device_lifts_after_the_original_and_drops_a_cached_main_stream(
        monkeypatch, blend_stream, lifted):
    calls = []

    class Worker:
        def __init__(self):
            self.vllm_config = _engine(blend_stream)
            self.device = "cuda:0"

        def init_device(self):
            calls.append("original")
            self.model_runner = types.SimpleNamespace(main_stream="cached before")

    lifted_to = types.SimpleNamespace(priority=-5)

    def lift(device):
        calls.append(("lift", device))
        return lifted_to

    monkeypatch.setattr(forward_priority, "lift_current_stream", lift)
    module = types.SimpleNamespace(Worker=Worker)
    forward_priority._wrap_init_device(module)
    forward_priority._wrap_init_device(module)  # the plugin loads more than once
    worker = Worker()
    worker.init_device()
    if lifted:
        assert calls == ["original", ("lift", "cuda:0")]
        assert "main_stream" not in vars(worker.model_runner)
    else:
        assert calls == ["original"]
        assert worker.model_runner.main_stream == "cached before"

"""The blend stream on a real GPU (blend/side_stream.py; tests/unit/test_side_stream.py
has the ordering rules with fake streams): work queued there runs beside the current
stream instead of ahead of it, deferred actions wait for it, and both orderings hold."""
import pytest
import torch

from vllm_kvflow.blend.side_stream import BlendStream

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# ~0.2-0.5 s of GPU time on current cards: long beside the host's microseconds.
SLEEP_CYCLES = 500_000_000


def _forward_stand_in(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    total = x.sum()
    done = torch.cuda.Event()
    done.record()
    return total, done


def test_current_stream_work_is_not_held_up_by_blend_work():
    stream = BlendStream.for_device("cuda", enabled=True)
    assert stream.separate
    x = torch.ones(1024, device="cuda")
    # Every kernel and allocation used below once first: a first launch loads its module
    # and a first allocation calls cudaMalloc, either of which may wait for the device.
    with stream.queued():
        torch.cuda._sleep(1000)
        blend_done = torch.cuda.Event()
        blend_done.record()
    _forward_stand_in(x)[1].synchronize()
    torch.cuda.synchronize()
    stream.run_ready()

    ran = []
    with stream.queued():
        torch.cuda._sleep(SLEEP_CYCLES)
        blend_done = torch.cuda.Event()
        blend_done.record()
        stream.after_queued(lambda: ran.append("blend done"))
    total, done = _forward_stand_in(x)  # queued after the blend work, on the current stream
    done.synchronize()
    assert float(total) == 1024.0
    assert not blend_done.query(), "the current stream waited for the blend stream's work"
    stream.run_ready()
    assert ran == []
    torch.cuda.synchronize()
    stream.run_ready()
    assert ran == ["blend done"]


def test_blend_work_sees_earlier_current_stream_writes_and_join_orders_reads_after_it():
    stream = BlendStream.for_device("cuda", enabled=True)
    src = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(SLEEP_CYCLES // 4)  # the write below lands late on the current stream
    src.fill_(3.0)
    out = torch.empty_like(src)
    with stream.queued():
        out.copy_(src * 2)  # must read the 3s: the blend stream waits for the current one
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        out.add_(1.0)
    stream.join()  # what the current stream queues now reads the finished result
    check = out.clone()
    torch.cuda.synchronize()
    assert torch.equal(check, torch.full_like(src, 7.0))


def test_disabled_or_cpu_runs_inline():
    assert not BlendStream.for_device("cuda", enabled=False).separate
    assert not BlendStream.for_device("cpu", enabled=True).separate


def test_an_entry_computed_on_the_blend_stream_is_encoded_whole_on_a_writer_thread():
    import threading

    from vllm_kvflow.store.chunk_format import decode, encode
    from vllm_kvflow.store.entry import ChunkKV

    stream = BlendStream.for_device("cuda", enabled=True)
    with stream.queued():
        keys = torch.zeros(2, 64, 8, 128, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES // 4)  # the write lands late on the blend stream
        keys.fill_(2.0)
        entry = ChunkKV(tuple(range(64)), keys, keys + 1, 1).mark_computed()
    out = []
    writer = threading.Thread(target=lambda: out.append(encode("k", "id", entry)))
    writer.start()
    writer.join()
    back = decode(out[0], "k", "id")
    assert torch.equal(back.keys, torch.full((2, 64, 8, 128), 2.0))


def test_a_lifted_current_stream_outranks_the_blend_stream_and_the_orderings_hold():
    """blend_stream "background" (patches/forward_priority.py): vLLM's thread queues on
    a stream above the blend stream; the blend stream still starts after its writes."""
    from vllm_kvflow.patches.forward_priority import lift_current_stream

    before = torch.cuda.current_stream()
    try:
        lifted = lift_current_stream(torch.device("cuda"))
        assert torch.cuda.current_stream() == lifted
        stream = BlendStream.for_device("cuda", enabled=True)
        assert lifted.priority < stream.stream.priority  # a lower number runs first
        src = torch.zeros(1 << 20, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        src.fill_(5.0)
        out = torch.empty_like(src)
        with stream.queued():
            out.copy_(src + 1)
        stream.join()
        check = out.clone()
        torch.cuda.synchronize()
        assert torch.equal(check, torch.full_like(src, 6.0))
    finally:
        torch.cuda.set_stream(before)


def test_private_streams_are_no_pooled_stream_and_graphs_capture_on_them():
    """kvflow's capture and blend streams (blend/private_stream.py) are none of the
    streams torch.cuda.Stream() hands out (whose cuBLAS workspaces vLLM's graphs may
    hold), made once, and a GEMM graph captured on the capture stream replays right on
    the blend stream."""
    from vllm_kvflow.blend.private_stream import private_stream

    capture, blend = private_stream("cuda", "capture"), private_stream("cuda", "blend")
    assert private_stream("cuda", "capture") is capture
    pooled = {torch.cuda.Stream().cuda_stream for _ in range(80)}
    pooled |= {torch.cuda.Stream(priority=-1).cuda_stream for _ in range(80)}
    assert capture.cuda_stream not in pooled and blend.cuda_stream not in pooled
    assert capture.cuda_stream != blend.cuda_stream
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):
        out = a @ a  # cuBLAS set up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        out = a @ a
    a.copy_(torch.randn_like(a))
    blend.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(blend):
        graph.replay()
    torch.cuda.current_stream().wait_stream(blend)
    torch.testing.assert_close(out, a @ a)


def test_stall_report_names_both_streams_states():
    """The worker's pending-work line for the stall report (blend/stall_watch.py) says
    whether the blend stream and vLLM's default stream still have GPU work."""
    from vllm_kvflow.connector.worker import KVFlowWorker

    worker = object.__new__(KVFlowWorker)
    worker._queue = type("Q", (), {"__len__": lambda self: 2})()
    worker._stream = BlendStream.for_device("cuda", enabled=True)
    torch.cuda.synchronize()
    assert worker._pending() == ("2 loads queued; blend stream idle; vLLM's default stream idle")
    torch.cuda._sleep(SLEEP_CYCLES)  # on the default stream
    assert "vLLM's default stream busy" in worker._pending()
    torch.cuda.synchronize()

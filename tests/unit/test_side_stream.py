"""The blend stream (blend/side_stream.py): blend work beside vLLM's forward, whatever
depends on it deferred until the GPU has passed it. CUDA streams and events are played
by fakes whose completion the test sets; tests/gpu/test_side_stream_gpu.py runs the
real ones."""
import types

import pytest

from vllm_kvflow.blend import side_stream
from vllm_kvflow.blend.side_stream import BlendStream


class FakeEvent:
    def __init__(self, log, name):
        self.done = False
        self.name = name
        log.append(("record", name))

    def query(self):
        return self.done


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name, self.device = log, name, "cuda:0"
        self.events = []

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))

    def record_event(self):
        event = FakeEvent(self.log, f"{self.name}{len(self.events)}")
        self.events.append(event)
        return event


@pytest.fixture
def fake(monkeypatch):
    log = []
    main, blend = FakeStream(log, "main"), FakeStream(log, "blend")
    current = [main]

    class Use:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.previous = current[0]
            current[0] = self.stream
            log.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            current[0] = self.previous
            log.append(("exit", self.stream.name))

    monkeypatch.setattr(side_stream, "_current_stream", lambda device: current[0])
    monkeypatch.setattr(side_stream, "_use_stream", Use)
    return types.SimpleNamespace(log=log, main=main, blend=blend, current=current,
                                 stream=BlendStream(blend))


def test_inline_runs_deferred_actions_at_the_next_poll_in_order():
    stream = BlendStream.for_device("cpu", enabled=True)
    assert not stream.separate and not stream.busy()
    ran = []
    with stream.queued():
        stream.after_queued(lambda: ran.append(1))
    stream.after_queued(lambda: ran.append(2))
    stream.join()
    assert ran == []
    stream.run_ready()
    assert ran == [1, 2]


def test_blend_work_starts_after_what_the_current_stream_queued_and_runs_on_its_own(fake):
    seen = []
    with fake.stream.queued():
        seen.append(fake.current[0].name)
    assert seen == ["blend"] and fake.current[0] is fake.main
    # The wait comes first (blocks may still be written by their previous owner's forward),
    # the event after the block's work.
    assert fake.log == [("wait", "blend", "main"), ("enter", "blend"), ("exit", "blend"),
                        ("record", "blend0")]


def test_an_action_waits_for_its_own_block_and_actions_keep_their_order(fake):
    ran = []
    with fake.stream.queued():
        fake.stream.after_queued(lambda: ran.append("first"))
    with fake.stream.queued():
        # Inside a block: waits for this block's event, not the previous one.
        fake.stream.after_queued(lambda: ran.append("second"))
    fake.stream.after_queued(lambda: ran.append("outside"))  # after the latest block
    first, second = fake.blend.events
    fake.stream.run_ready()
    assert ran == []
    second.done = True  # the GPU finished the second block first: order still holds
    fake.stream.run_ready()
    assert ran == []
    first.done = True
    fake.stream.run_ready()
    assert ran == ["first", "second", "outside"]


def test_busy_while_the_latest_work_runs_and_join_orders_the_current_stream_after_it(fake):
    assert not fake.stream.busy()
    with fake.stream.queued():
        assert not fake.stream.busy()  # nothing earlier is running
    assert fake.stream.busy()
    fake.blend.events[-1].done = True
    assert not fake.stream.busy()
    fake.log.clear()
    fake.stream.join()
    assert fake.log == [("wait", "main", "blend")]


def test_a_failing_block_still_records_its_event_and_keeps_its_actions(fake):
    ran = []
    with pytest.raises(RuntimeError):
        with fake.stream.queued():
            fake.stream.after_queued(lambda: ran.append("kept"))
            raise RuntimeError("pass failed")
    assert fake.current[0] is fake.main
    fake.blend.events[-1].done = True
    fake.stream.run_ready()
    assert ran == ["kept"]


def test_worker_reports_loads_and_aborts_only_once_their_gpu_work_is_done(fake):
    """A finished asynchronous load reaches vLLM (get_finished) only after the blend
    stream passed it, so no forward reads its KV before; an aborted request's blocks go
    back likewise, so no queued write lands in them once reused; a synchronous load is
    recorded at once (its forward is queued after it on the current stream)."""
    pytest.importorskip("vllm")
    from vllm_kvflow.blend.work_queue import Finished
    from vllm_kvflow.connector.worker import KVFlowWorker

    worker = object.__new__(KVFlowWorker)
    worker._stream = fake.stream
    worker._results, worker._held, worker._done, worker._failed_blocks = {}, {}, set(), set()
    worker.store = types.SimpleNamespace(stats=lambda: {})
    worker._queue = types.SimpleNamespace(cancel=lambda req_id: object() if req_id == "aborted" else None)

    def plan(req_id, sync=False):
        return types.SimpleNamespace(req_id=req_id, sync=sync, block_ids=[1])

    with fake.stream.queued():
        worker._finish(plan("loaded"), Finished(None), 0.0)
        worker._finish(plan("sync", sync=True), Finished(None), 0.0)
    assert "sync" in worker._results and "loaded" not in worker._results
    assert worker.get_finished({"aborted", "unknown"}) == (None, None)
    fake.blend.events[-1].done = True
    assert worker.get_finished(set()) == (None, {"loaded", "aborted"})
    assert set(worker._results) == {"sync", "loaded"}
    assert worker.get_finished(set()) == (None, None)


def test_the_setting_is_validated_and_a_separate_stream_is_for_one_gpu_rank_only():
    pytest.importorskip("vllm")
    from vllm_kvflow.config import KVFlowConfig
    from vllm_kvflow.connector.worker import separate_blend_stream

    assert KVFlowConfig().blend_stream == "side"
    for bad in ("Side", "", None, 1):
        with pytest.raises(ValueError, match="blend_stream"):
            KVFlowConfig(blend_stream=bad)

    def engine(device, tp):
        return types.SimpleNamespace(device_config=types.SimpleNamespace(device_type=device),
                                     parallel_config=types.SimpleNamespace(tensor_parallel_size=tp))

    side = KVFlowConfig(blend_stream="side")
    assert separate_blend_stream(side, engine("cuda", 1))
    assert not separate_blend_stream(side, engine("cuda", 2))  # collectives in one order
    assert not separate_blend_stream(side, engine("cpu", 1))
    assert separate_blend_stream(KVFlowConfig(), engine("cuda", 1))  # the default
    assert not separate_blend_stream(KVFlowConfig(blend_stream="main"), engine("cuda", 1))
    background = KVFlowConfig(blend_stream="background")  # a side stream, below vLLM's
    assert separate_blend_stream(background, engine("cuda", 1))
    assert not separate_blend_stream(background, engine("cuda", 2))
    assert not separate_blend_stream(background, engine("cpu", 1))


def test_a_writer_thread_waits_for_the_work_that_computed_an_entry():
    """The disk and remote writers encode entries on threads of their own, whose CUDA
    stream is not ordered after the blend stream that computed them: encode waits for
    the event ChunkStore.put recorded (a CPU entry records none)."""
    import torch

    from vllm_kvflow.store.chunk_format import encode
    from vllm_kvflow.store.entry import ChunkKV

    kv = torch.zeros(1, 2, 1, 4)
    entry = ChunkKV((1, 2), kv, kv.clone(), 1)
    assert entry.mark_computed().ready is None  # on CPU: nothing to wait for
    waited = []
    entry.ready = types.SimpleNamespace(synchronize=lambda: waited.append(True))
    encode("key", "identity", entry)
    assert waited == [True]

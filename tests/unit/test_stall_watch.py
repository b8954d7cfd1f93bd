"""The stall report (blend/stall_watch.py): an engine that stops stepping while blend
work is pending gets one report, with what was pending and every thread's stack; an
idle engine, or one that steps, gets none."""
from __future__ import annotations

import io
import logging
import threading

from vllm_kvflow.blend.stall_watch import StallWatch


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _watch(pending):
    clock, out = Clock(), io.StringIO()
    return StallWatch(30.0, lambda: pending[0], clock=clock, stream=out), clock, out


def test_a_stall_with_work_pending_is_reported_once_with_every_threads_stack(caplog):
    caplog.set_level(logging.ERROR, logger="vllm_kvflow")
    pending = ["3 loads queued"]
    watch, clock, out = _watch(pending)
    clock.now += 29.0
    assert not watch.check()  # not yet
    clock.now += 2.0
    assert watch.check()
    assert "no engine step finished for 31 s with work pending (3 loads queued)" in caplog.text
    assert "test_a_stall_with_work_pending_is_reported_once" in out.getvalue()  # this thread's stack
    clock.now += 60.0
    assert not watch.check()  # once per stall
    watch.enter()
    watch.leave()  # a step finished: re-armed
    clock.now += 31.0
    assert watch.check()


def test_an_idle_engine_is_no_stall():
    pending = [None]
    watch, clock, out = _watch(pending)
    clock.now += 1000.0
    assert not watch.check() and out.getvalue() == ""
    pending[0] = "1 loads queued"
    assert watch.check()


def test_a_call_that_never_returns_is_a_stall_even_with_nothing_queued(caplog):
    caplog.set_level(logging.ERROR, logger="vllm_kvflow")
    watch, clock, out = _watch([None])
    watch.enter()
    clock.now += 31.0
    assert watch.check()
    assert "a connector call still running; no queued work" in caplog.text


def test_steps_keep_it_quiet():
    watch, clock, _ = _watch(["1 loads queued"])
    for _ in range(10):
        clock.now += 20.0
        watch.enter()
        watch.leave()
        assert not watch.check()


def test_the_watch_thread_reports_and_stops():
    out = io.StringIO()
    reported = threading.Event()

    def pending():
        reported.set()
        return None

    watch = StallWatch(0.04, pending, stream=out).start()
    assert reported.wait(5.0)  # the thread checks on its own
    watch.stop()
    watch._thread.join(5.0)
    assert not watch._thread.is_alive()


def test_the_setting():
    import pytest

    from vllm_kvflow.config import KVFlowConfig

    assert KVFlowConfig().stall_report_s == 120.0
    assert KVFlowConfig(stall_report_s=None).stall_report_s is None
    for bad in (0, -1, "60", True):
        with pytest.raises(ValueError, match="stall_report_s"):
            KVFlowConfig(stall_report_s=bad)


def test_the_workers_pending_work_as_the_report_names_it():
    """KVFlowWorker._pending: queued loads and actions deferred behind the blend stream
    are pending work; an idle worker has none."""
    from vllm_kvflow.blend.side_stream import BlendStream
    from vllm_kvflow.connector.worker import KVFlowWorker

    worker = object.__new__(KVFlowWorker)
    worker._queue, worker._stream = None, BlendStream(None)
    assert worker._pending() is None
    worker._queue = type("Q", (), {"__len__": lambda self: 3})()
    assert worker._pending() == "3 loads queued"
    worker._stream._pending.append((None, lambda: None))
    assert worker._pending() == "3 loads queued; 1 actions deferred behind the blend stream"

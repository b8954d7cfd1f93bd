"""A report when the engine stops stepping while blend work is pending.

A stalled engine process answers nothing: its requests hang, and a signal sent to it
from outside may not reach a handler (on vLLM 0.26's GPU engine core `kill -USR1` gave
no stacks where an API server's gave them). So the worker watches itself: a daemon
thread notes when the connector last finished a call from vLLM, and when none has
finished for `stall_report_s` while work was pending (loads queued, blend work
deferred behind the GPU, or a call still running), it logs what was pending, the
blend stream's state (GPU work outstanding or not: a GPU that never finishes and a
host thread that waits on something else look the same from outside), and every
thread's Python stack. Once per stall: it re-arms when a call finishes.

Nothing here waits for the GPU: `describe` only queries.
"""
from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
from typing import Callable

logger = logging.getLogger("vllm_kvflow")


class StallWatch:
    def __init__(self, after_s: float, describe: Callable[[], str | None],
                 clock: Callable[[], float] = time.monotonic, stream=None):
        """after_s: seconds without a finished call, with work pending, before the report.
        describe(): what is pending, or None when nothing is (an idle engine does not
        step, and that is no stall). stream: where the stacks go (default stderr)."""
        self.after_s = after_s
        self._describe = describe
        self._clock = clock
        self._stream = stream
        self._last = clock()
        self._inside = 0  # calls from vLLM under way
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StallWatch":
        self._thread = threading.Thread(target=self._run, name="kvflow-stall-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def enter(self) -> None:
        """A call from vLLM starts."""
        self._inside += 1

    def leave(self) -> None:
        """A call from vLLM finished: the engine is stepping."""
        self._inside -= 1
        self._last = self._clock()
        self._reported = False

    def check(self) -> bool:
        """Report now if the engine has stalled; whether a report was made."""
        if self._reported or self._clock() - self._last < self.after_s:
            return False
        pending = self._describe()
        if self._inside:
            pending = f"a connector call still running; {pending or 'no queued work'}"
        if pending is None:
            return False
        self._reported = True
        logger.error("kvflow: no engine step finished for %.0f s with work pending (%s); every "
                     "thread's Python stack follows", self._clock() - self._last, pending)
        out = self._stream or sys.stderr
        try:
            faulthandler.dump_traceback(file=out, all_threads=True)
        except (AttributeError, ValueError, OSError):  # no file descriptor (a test's stream)
            out.write(_python_stacks())
        out.flush()
        return True

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.after_s / 4)):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must never take the engine down
                logger.exception("kvflow: stall watch failed")


def _python_stacks() -> str:
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)

"""A periodic log line of the engine's step timing, seen from the connector (setting
log_steps_every_s).

vLLM calls the worker's start_load_kv once per engine step (0.26: right before it
queues the step's forward; 0.32: right after it). The time between two calls is the
step period the host sees, and the time spent inside the call is the connector's host
work, which delays a forward (on 0.26 that very step's) however the GPU work is queued
(blend_stream main, side or background). One
line per interval gives both, for steps with blend work and without, which is what a
small request arriving during a burst of misses waits for. Cheap enough to leave on:
two clock reads per step and a few list appends.

With `device_calls` (GPU engines) the line also counts the caching allocator's
cudaMalloc and cudaFree calls made inside the connector's steps with blend work, and
how many of its slow steps (SLOW_STEP_S and over) made one: a step that stores new
chunk entries may have to map fresh device memory, and a cudaFree waits for the whole
device. Two reads of the allocator's counters per step (tens of microseconds each).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

logger = logging.getLogger("vllm_kvflow")

LINE_PREFIX = "kvflow steps (last"  # how readers of a server log find the lines
SLOW_STEP_S = 0.020  # a step with blend work this long on the host counts as slow


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"{len(values)}, p50 {_ms(values, 0.5):.1f} / p90 {_ms(values, 0.9):.1f} / "
            f"max {_ms(values, 1.0):.1f} ms")


class StepLog:
    def __init__(self, every_s: float | None, clock: Callable[[], float] = time.perf_counter,
                 emit: Callable[[str], None] | None = None,
                 device_calls: Callable[[], tuple[int, int]] | None = None):
        """every_s: seconds between log lines (None: off). device_calls(): the
        allocator's cumulative (cudaMalloc, cudaFree) counts, or None."""
        self.every_s = every_s
        self.clock = clock
        self.emit = emit or (lambda line: logger.info("%s", line))
        self.device_calls = device_calls
        self._calls_at_begin = (0, 0)
        self._mallocs = self._frees = self._steps_calling = 0
        self._slow = self._slow_calling = 0
        self._window_start: float | None = None
        self._last_start: float | None = None
        self._periods: list[float] = []
        self._host_work: list[float] = []   # connector time in steps with blend work
        self._host_idle: list[float] = []   # and in steps without

    @property
    def enabled(self) -> bool:
        return self.every_s is not None

    def begin(self) -> float | None:
        """At the start of start_load_kv: the step's start time (None when off)."""
        if self.every_s is None:
            return None
        now = self.clock()
        if self._last_start is not None:
            self._periods.append(now - self._last_start)
        self._last_start = now
        if self._window_start is None:
            self._window_start = now
        if self.device_calls is not None:
            self._calls_at_begin = self.device_calls()
        return now

    def end(self, started: float | None, worked: bool) -> None:
        """At the end of start_load_kv; worked: the step ran blend work."""
        if started is None:
            return
        now = self.clock()
        (self._host_work if worked else self._host_idle).append(now - started)
        if worked and self.device_calls is not None:
            mallocs, frees = (b - a for a, b in zip(self._calls_at_begin, self.device_calls()))
            calling = bool(mallocs or frees)
            self._mallocs += mallocs
            self._frees += frees
            self._steps_calling += calling
            if now - started >= SLOW_STEP_S:
                self._slow += 1
                self._slow_calling += calling
        if now - self._window_start >= self.every_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._window_start is None or not (self._periods or self._host_work or self._host_idle):
            return
        now = self.clock() if now is None else now
        line = (f"{LINE_PREFIX} {now - self._window_start:.1f} s): periods "
                f"{_summary(self._periods)}; connector host time, steps with blend work "
                f"{_summary(self._host_work)}, others {_summary(self._host_idle)}")
        if self.device_calls is not None:
            line += (f"; cudaMalloc / cudaFree in steps with blend work {self._mallocs} / "
                     f"{self._frees}, in {self._steps_calling} steps; slow steps (>= "
                     f"{1e3 * SLOW_STEP_S:.0f} ms) {self._slow}, {self._slow_calling} of them calling")
        self.emit(line)
        self._window_start = now
        self._periods, self._host_work, self._host_idle = [], [], []
        self._mallocs = self._frees = self._steps_calling = self._slow = self._slow_calling = 0


def device_calls_of(device) -> Callable[[], tuple[int, int]] | None:
    """The caching allocator's cumulative (cudaMalloc, cudaFree) counts on a CUDA
    device, as a callable; None elsewhere."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None

    def read() -> tuple[int, int]:
        stats = torch.cuda.memory_stats(device)
        return int(stats.get("num_device_alloc", 0)), int(stats.get("num_device_free", 0))

    return read

"""Blend work on a CUDA stream of its own, beside vLLM's forward (opt-in:
blend_stream "side").

vLLM calls the connector's start_load_kv right before it queues a step's forward, on
the same stream. Blend work queued there (isolated computes, scoring, recompute: tens
of ms of GPU work per step during a burst of misses) runs ahead of the forward, and
every request in the step, decoding or starting, waits for it. On a stream of its own
it runs beside the forward instead, sharing the GPU.

Ordering, none of it making the host wait:
- a step's blend work starts after everything vLLM queued before it (`queued`): the
  blocks vLLM hands a loading request may still be written by their previous owner's
  last forward, and entries computed on vLLM's stream must be complete;
- whatever depends on that work is deferred (`after_queued`) and runs once the GPU has
  passed it (`run_ready`, polled each step): a finished load is reported to vLLM only
  then (a later forward reads its KV), and an aborted request's blocks go back only
  then (vLLM hands them to another request). No forward waits for blend work on the
  GPU; a load's report may come a step later than on vLLM's stream;
- one step's work in flight (`busy`): a step whose predecessor's work still runs
  queues none, so the blend work never takes more than about half of the GPU from
  the forwards.

Measured on an H200 (README, "Under load"): a small request during a burst of misses
reached its first token in 3.5x its time alone against 6.8x on vLLM's stream, but at
C = 32 the blend work ran at about half the rate (infoflow 2.89x full's throughput
against 3.22x). Two variants did worse: two steps in flight (the forwards then shared
the GPU with more blend work: 17x on a slower host), and reporting loads at once with
vLLM's stream made to wait for their work (a forward then waited for two steps of it:
16x, throughput unchanged). Hence opt-in then. With the isolated arena (isolated_arena.py),
whose passes cost the host almost nothing, the probe took 1.8x its time alone against
4.7x on vLLM's stream, at 2.85x against 2.99x full's throughput; but C = 8 load runs on
this stream hung the GPU: vLLM's stream and this one both stopped, with no error. The
suspected cause: kvflow's graphs, captured on pooled streams, shared cuBLAS workspaces
with vLLM's forward graphs, which only concurrent replays expose. The stream here and
the capture stream are now kvflow's own (private_stream.py), and the same runs go
clean; with 3/16 of the step's tokens per step (connector/worker.step_budget) C = 32
infoflow gave 3.06x full's throughput. Hence the default on GPU engines of one rank.
Its probe stayed at 3.1-3.4x until a blocking copy in every new load was made
asynchronous (the host had waited out vLLM's forward in each step that started a load):
2.1-2.7x since, throughput unchanged (README, "The slow steps found").

Without a stream (blend_stream "main"; CPU engines; several tensor-parallel ranks, whose
collectives must run in one order on every rank) everything runs inline on the current
stream and deferred actions run at the next `run_ready`.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import torch


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device)


def _use_stream(stream):
    return torch.cuda.stream(stream)


class BlendStream:
    def __init__(self, stream=None):
        """stream: a torch.cuda.Stream for the blend work, or None: inline."""
        self.stream = stream
        self._last = None  # event recorded after the latest queued work
        self._open: list[Callable[[], None]] | None = None  # deferred inside `queued`
        self._pending: deque[tuple[object, Callable[[], None]]] = deque()

    @classmethod
    def for_device(cls, device: torch.device | str, enabled: bool) -> "BlendStream":
        device = torch.device(device)
        if enabled and device.type == "cuda":
            from vllm_kvflow.blend.private_stream import private_stream

            return cls(private_stream(device, "blend"))
        return cls(None)

    @property
    def separate(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def queued(self):
        """Queue the block's GPU work on the blend stream, after all the work queued on
        the current stream so far; actions deferred inside wait for this block's work."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(_current_stream(self.stream.device))
        self._open = []
        try:
            with _use_stream(self.stream):
                yield
        finally:
            deferred, self._open = self._open, None
            self._last = self.stream.record_event()
            self._pending.extend((self._last, action) for action in deferred)

    def busy(self) -> bool:
        """Whether the latest block's work is still running."""
        return self._last is not None and not self._last.query()

    def join(self) -> None:
        """Make the current stream wait for all queued blend work (for work that reads
        its results on the current stream, such as this very step's forward)."""
        if self.stream is not None:
            _current_stream(self.stream.device).wait_stream(self.stream)

    def after_queued(self, action: Callable[[], None]) -> None:
        """Run action once the blend work queued so far (inside a `queued` block: that
        block's too) has run on the GPU."""
        if self._open is not None:
            self._open.append(action)
        else:
            self._pending.append((self._last, action))

    @property
    def pending(self) -> int:
        """Deferred actions not yet run."""
        return len(self._pending)

    def run_ready(self) -> None:
        """Run the deferred actions whose work is done, in the order they were deferred."""
        while self._pending:
            event, action = self._pending[0]
            if event is not None and not event.query():
                return
            self._pending.popleft()
            action()

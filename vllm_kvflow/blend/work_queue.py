"""The worker's queue of blend work, and how much of it one engine step carries.

Loads are asynchronous: the scheduler hands a request's load to the worker and vLLM
keeps scheduling other requests while it waits (WAITING_FOR_REMOTE_KVS), until the
worker reports it done. Each engine step the worker runs a bounded part of this queue:

- isolated computes (store and glue-cache misses), first come first served, at most
  `isolated_rows` rows per step, many chunks per batched pass; a chunk that several
  requests miss is computed once and becomes a hit for all of them;
- requests whose chunks are all present, first come first served, at most `blend_rows`
  rows (recompute rows plus what their signals cost) per step: their loads, then their
  signals, selections and recomputes, each a batched pass over all of them.

Each budget admits at least one item per step, so every request progresses. A request
waits for its own work and for work queued before it, never for a whole wave's, and
requests whose chunks are all hits never wait behind misses. Nothing here knows vLLM.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from vllm_kvflow.blend.pipeline import BlendPipeline, IsolatedCompute, Job
from vllm_kvflow.blend.signals import signal_rows

logger = logging.getLogger("vllm_kvflow")

# Fixed cost of one computed segment beyond its rows (its own attention calls, buffers
# and store insert), in rows: it keeps a flood of tiny chunks from looking free.
SEGMENT_OVERHEAD_ROWS = 32


class LoadRefused(Exception):
    """A load the queue will not run (its reason goes to the request's stats)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class StepBudget:
    blend_rows: int  # rows of signal and recompute passes per step
    isolated_rows: int  # rows of isolated computes per step
    # Isolated-compute rows one request may cause, as a multiple of its prompt length.
    max_isolated_per_prompt_token: float = 4.0


@dataclass
class _Task:
    compute: IsolatedCompute
    waiting: list[str] = field(default_factory=list)  # request ids

    @property
    def rows(self) -> int:
        return self.compute.rows + SEGMENT_OVERHEAD_ROWS


@dataclass
class Finished:
    job: Job
    error: BaseException | None = None


def _all_ranks(flags: list[bool]) -> list[bool]:
    return flags


class WorkQueue:
    def __init__(self, pipeline: BlendPipeline, budget: StepBudget,
                 all_ranks: Callable[[list[bool]], list[bool]] = _all_ranks):
        """all_ranks(flags): flags true on every tensor-parallel rank (each rank has its
        own store, and all must compute the same chunks: their passes run collectives)."""
        self.pipeline = pipeline
        self.budget = budget
        self._all_ranks = all_ranks
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # in arrival order
        self._tasks: OrderedDict[object, _Task] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def pending_isolated_rows(self) -> int:
        return sum(t.rows for t in self._tasks.values())

    # -- arrivals and departures --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Look the job's chunks up and queue what it misses. Raises LoadRefused when it
        would cause more isolated computes than its budget."""
        missing = self.pipeline.resolve(job)
        hits = [seg.entry is not None for seg in job.segments]
        agreed = self._all_ranks(hits)
        for seg, here, everywhere in zip(job.segments, hits, agreed):
            if here and not everywhere:  # another rank misses it: compute it here too
                seg.entry = None
                missing.append(self.pipeline.isolated_compute_for(seg))
        rows = sum(t.rows + SEGMENT_OVERHEAD_ROWS for t in missing)
        limit = self.budget.max_isolated_per_prompt_token * len(job.plan.token_ids)
        if rows > limit:
            raise LoadRefused("isolated-compute-limit",
                              f"{len(missing)} missing segments would take {rows} rows of isolated "
                              f"compute, over {limit:.0f} ({self.budget.max_isolated_per_prompt_token:g} "
                              f"x the prompt's {len(job.plan.token_ids)} tokens)")
        for compute in missing:
            task = self._tasks.get(compute.key)
            if task is None:
                task = self._tasks[compute.key] = _Task(compute)
            if job.req_id not in task.waiting:
                task.waiting.append(job.req_id)
        self._jobs[job.req_id] = job

    def cancel(self, req_id: str) -> Job | None:
        """Forget a request (aborted); its isolated computes stay queued only while
        another request waits for them."""
        job = self._jobs.pop(req_id, None)
        if job is None:
            return None
        for key in [k for k, t in self._tasks.items() if req_id in t.waiting]:
            task = self._tasks[key]
            task.waiting.remove(req_id)
            if not task.waiting:
                del self._tasks[key]
        return job

    # -- one engine step ------------------------------------------------------------------------
    def step(self) -> list[Finished]:
        """Run this step's share of the work; the jobs that finished (or failed)."""
        finished = self._run_isolated()
        ready = [j for j in self._jobs.values() if not j.missing()]
        batch, rows = [], 0.0
        num_layers = self.pipeline.adapter.num_layers
        for job in ready:
            cost = job_rows(job, num_layers)
            if batch and rows + cost > self.budget.blend_rows:
                break
            batch.append(job)
            rows += cost
        if batch:
            for job in batch:
                del self._jobs[job.req_id]
            finished += self._blend(batch)
        return finished

    def _run_isolated(self) -> list[Finished]:
        batch, rows = [], 0
        for task in self._tasks.values():
            if batch and rows + task.rows > self.budget.isolated_rows:
                break
            batch.append(task)
            rows += task.rows
        if not batch:
            return []
        for task in batch:
            del self._tasks[task.compute.key]
        try:
            entries = self.pipeline.compute_isolated_batch([t.compute for t in batch])
        except Exception as e:  # noqa: BLE001 - the waiting requests fall back, the server lives
            logger.exception("kvflow: isolated compute of %d segments failed", len(batch))
            return [self._fail(req_id, e) for task in batch for req_id in task.waiting
                    if req_id in self._jobs]
        for task, entry in zip(batch, entries):
            for req_id in task.waiting:
                job = self._jobs.get(req_id)
                if job is not None:
                    self.pipeline.deliver(job, task.compute.key, entry)
        return []

    def _fail(self, req_id: str, error: BaseException) -> Finished:
        job = self.cancel(req_id)
        return Finished(job, error)

    def _blend(self, jobs: list[Job]) -> list[Finished]:
        """Load, select and recompute a batch of ready jobs. A job whose own load fails
        falls back alone; a failure of a batched pass fails the batch."""
        loaded, finished = [], []
        for job in jobs:
            try:
                self.pipeline.load(job)
                loaded.append(job)
            except Exception as e:  # noqa: BLE001
                logger.exception("kvflow: load for %s failed", job.req_id)
                finished.append(Finished(job, e))
        try:
            self.pipeline.select_batch(loaded)
            self.pipeline.recompute_batch(loaded)
        except Exception as e:  # noqa: BLE001
            logger.exception("kvflow: blend pass over %d requests failed", len(loaded))
            return finished + [Finished(job, e) for job in loaded]
        return finished + [Finished(job) for job in loaded]


def job_rows(job: Job, num_layers: int) -> float:
    """A ready job's cost in the blend budget: its recompute rows and its signals'
    (twice for a method that reorders: it selects once before its final layout)."""
    rows = job.recompute_rows() + signal_rows(job, num_layers)
    return 2 * rows if job.method.reorders else rows

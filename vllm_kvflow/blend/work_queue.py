"""The worker's queue of blend work, and how much of it one engine step carries.

Loads are asynchronous: the scheduler hands a request's load to the worker and vLLM
keeps scheduling other requests while it waits (WAITING_FOR_REMOTE_KVS), until the
worker reports it done. Each engine step the worker runs a bounded part of this queue:

- isolated computes (store and glue-cache misses), first come first served, at most
  `isolated_rows` rows per step, many chunks per batched pass; a chunk that several
  requests miss is computed once and becomes a hit for all of them;
- at most `blend_rows` rows of blend work: new requests whose chunks are all present
  (first come first served, within half of it): their loads, signals and selections,
  one batched pass per signal; then the recomputes of every selected request, the rows
  shared fairly between them, in one batched pass to which each request contributes a
  slice of its selected tokens.

A request's recompute may take several steps: its selected tokens are recomputed in
position order, a slice per step, which is exact (a token only attends to earlier
positions, whose new K/V earlier slices have already written, and to itself). So a step
carries bounded work however large a request is, and small requests and decoding go on
at their pace during a burst. Each budget admits at least one item per step, so every
request progresses; a request waits for its own work and for work queued before it,
never for a whole wave's, and requests whose chunks are all hits never wait behind
misses. Nothing here knows vLLM.
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


def isolated_rows(compute: IsolatedCompute) -> int:
    """An isolated compute's cost in the budgets: its rows and the segment overhead."""
    return compute.rows + SEGMENT_OVERHEAD_ROWS


@dataclass
class _Task:
    compute: IsolatedCompute
    waiting: list[str] = field(default_factory=list)  # request ids

    @property
    def rows(self) -> int:
        return isolated_rows(self.compute)


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

    # -- arrivals and departures --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Look the job's chunks up and queue what it misses. Raises LoadRefused when it
        would cause more isolated computes than its budget."""
        for compute in self._resolve(job):
            task = self._tasks.get(compute.key)
            if task is None:
                task = self._tasks[compute.key] = _Task(compute)
            if job.req_id not in task.waiting:
                task.waiting.append(job.req_id)
        self._jobs[job.req_id] = job

    def run_now(self, job: Job) -> Finished:
        """A synchronous load (the forward of this very step reads its KV): the whole job
        at once, its misses computed here, outside the step budgets. Raises LoadRefused
        like submit."""
        missing = {c.key: c for c in self._resolve(job)}  # a chunk declared twice: once
        try:
            self.pipeline.run_whole(job, list(missing.values()))
        except Exception as e:  # noqa: BLE001 - the request falls back, the server lives
            logger.exception("kvflow: load for %s failed", job.req_id)
            return Finished(job, e)
        return Finished(job)

    def _resolve(self, job: Job) -> list[IsolatedCompute]:
        """The job's segments looked up, hits agreed on by every tensor-parallel rank;
        what it misses. LoadRefused if that costs more than its isolated budget."""
        missing = self.pipeline.resolve(job)
        hits = [seg.entry is not None for seg in job.segments]
        agreed = self._all_ranks(hits)
        for seg, here, everywhere in zip(job.segments, hits, agreed):
            if here and not everywhere:  # another rank misses it: compute it here too
                seg.entry = None
                missing.append(self.pipeline.isolated_compute_for(seg))
        rows = sum(isolated_rows(t) for t in missing)
        limit = self.budget.max_isolated_per_prompt_token * len(job.plan.token_ids)
        if rows > limit:
            raise LoadRefused("isolated-compute-limit",
                              f"{len(missing)} missing segments would take {rows} rows of isolated "
                              f"compute, over {limit:.0f} ({self.budget.max_isolated_per_prompt_token:g} "
                              f"x the prompt's {len(job.plan.token_ids)} tokens)")
        return missing

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
    def step(self, others_running: bool = True) -> list[Finished]:
        """Run this step's share of the work; the jobs that finished (or failed). With
        no other request in the step's forward and one request queued, nobody waits for
        this step: that request's work runs whole (a lone request's TTFT)."""
        alone = not others_running and len(self._jobs) == 1
        finished = self._run_isolated(unbounded=alone)
        budget = float("inf") if alone else self.budget.blend_rows
        # 1. New requests whose chunks are all present: load, signals, selection, first
        #    come first served, within half the budget (at least one request), so that
        #    a burst of arrivals cannot stall the recomputes under way.
        num_layers = self.pipeline.adapter.num_layers
        fresh, rows = [], 0.0
        for job in self._jobs.values():
            if job.chosen is None and not job.missing():
                cost = selection_rows(job, num_layers)
                if fresh and rows + cost > budget / 2:
                    break
                fresh.append(job)
                rows += cost
        finished += self._select(fresh)
        # 2. The rest goes to the recomputes, shared fairly: every request with tokens
        #    left gets an equal share, and what a small one does not need goes to the
        #    others (so a small request finishes at once beside a large one).
        active = [j for j in self._jobs.values() if j.rows_left() > 0]
        if alone:
            return finished + self._recompute([[j, j.rows_left()] for j in active])
        return finished + self._recompute(fair_shares(active, max(1, int(budget - rows))))

    def _run_isolated(self, unbounded: bool = False) -> list[Finished]:
        batch, rows = [], 0
        for task in self._tasks.values():
            if batch and rows + task.rows > self.budget.isolated_rows and not unbounded:
                break
            batch.append(task)
            rows += task.rows
        if not batch:
            return []
        for task in batch:
            del self._tasks[task.compute.key]
        try:
            # Replicas sharing a tier: another may have stored a chunk since it missed here.
            fetched = [self.pipeline.fetch_shared(t.compute) for t in batch]
            agreed = self._all_ranks([e is not None for e in fetched])
            fetched = [e if ok else None for e, ok in zip(fetched, agreed)]
            to_compute = [t.compute for t, e in zip(batch, fetched) if e is None]
            computed = iter(self.pipeline.compute_isolated_batch(to_compute) if to_compute else [])
            entries = [e if e is not None else next(computed) for e in fetched]
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

    def _select(self, jobs: list[Job]) -> list[Finished]:
        """Load and select a batch of ready jobs; those with nothing to recompute are
        done. A job whose own load fails falls back alone; a failure of a batched pass
        fails the batch."""
        loaded, finished = [], []
        for job in jobs:
            try:
                self.pipeline.load(job)
                loaded.append(job)
            except Exception as e:  # noqa: BLE001
                logger.exception("kvflow: load for %s failed", job.req_id)
                finished.append(self._fail(job.req_id, e))
        try:
            self.pipeline.select_batch(loaded)
        except Exception as e:  # noqa: BLE001
            logger.exception("kvflow: selection pass over %d requests failed", len(loaded))
            return finished + [self._fail(job.req_id, e) for job in loaded]
        return finished + self._complete(loaded)

    def _recompute(self, slices: list[list]) -> list[Finished]:
        """One batched pass over each job's next `take` selected tokens; the jobs whose
        recompute ends here are done."""
        if not slices:
            return []
        try:
            self.pipeline.recompute_slices([(job, job.recomputed, job.recomputed + take)
                                            for job, take in slices])
        except Exception as e:  # noqa: BLE001
            logger.exception("kvflow: recompute pass over %d requests failed", len(slices))
            return [self._fail(job.req_id, e) for job, _ in slices]
        for job, take in slices:
            job.recomputed += take
        return self._complete([job for job, _ in slices])

    def _complete(self, jobs: list[Job]) -> list[Finished]:
        """The jobs with nothing left to recompute, taken out of the queue as done."""
        done = [job for job in jobs if job.rows_left() == 0]
        for job in done:
            del self._jobs[job.req_id]
        return [Finished(job) for job in done]


def fair_shares(jobs: list[Job], rows: int) -> list[list]:
    """[job, take] pairs giving `rows` to jobs by max-min fairness (water filling over
    their remaining tokens); with fewer rows than jobs, the oldest get one each."""
    if rows < len(jobs):
        return [[job, 1] for job in jobs[:rows]]
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].rows_left())
    takes = [0] * len(jobs)
    left = rows
    for rank, i in enumerate(order):
        share = left // (len(order) - rank)
        takes[i] = min(jobs[i].rows_left(), share)
        left -= takes[i]
    for i in range(len(jobs)):  # rows still unassigned (integer shares): oldest first
        extra = min(left, jobs[i].rows_left() - takes[i])
        takes[i] += extra
        left -= extra
    return [[job, take] for job, take in zip(jobs, takes) if take > 0]


def selection_rows(job: Job, num_layers: int) -> float:
    """What a ready job's signals cost in the blend budget (twice for a method that
    reorders: it selects once before its final layout)."""
    rows = signal_rows(job, num_layers)
    return 2 * rows if job.method.reorders else rows

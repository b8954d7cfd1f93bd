"""The worker's queue of blend work, and how much of it one engine step carries.

Loads are asynchronous: the scheduler hands a request's load to the worker and vLLM
keeps scheduling other requests while it waits (WAITING_FOR_REMOTE_KVS), until the
worker reports it done. Each engine step the worker runs a bounded part of this queue:

- isolated computes (store and glue-cache misses), first come first served, at most
  `isolated_rows` rows per step, many chunks per batched pass, a long one in slices of
  consecutive positions over several steps (exact: a row attends only to earlier
  positions); a chunk that several requests miss is computed once and becomes a hit
  for all of them;
- at most `blend_rows` rows of blend work: new requests whose chunks are all present
  (first come first served, within half of it): their loads, signals and selections,
  one batched pass per signal; then the recomputes of every selected request, the rows
  shared fairly between them, in one batched pass to which each request contributes a
  slice of its selected tokens.

A step whose forward starts new requests runs no blend work (at most `yield_steps` such
steps in a row), so that their first token does not wait for it. Where the passes run on
the host (CPU engines) the budgets are also bounded in time: `step_seconds` of blend work
per step, turned into rows by the seconds per row measured on earlier passes, one kind
of work per step, so that a small request arriving during a burst waits for a short
step, not for seconds of blend work.

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

from vllm_kvflow.blend.pipeline import BlendPipeline, IsolatedCompute, IsolatedRun, Job
from vllm_kvflow.blend.row_clock import RowClock
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
    # Blend work per step in seconds (None: rows only), for passes on the host: each
    # step runs one kind of work (isolated computes or blend), alternating.
    step_seconds: float | None = None
    # Steps in a row that may run no blend work because their forward starts requests.
    yield_steps: int = 1


def isolated_rows(compute: IsolatedCompute) -> int:
    """An isolated compute's cost in the budgets: its rows and the segment overhead."""
    return compute.rows + SEGMENT_OVERHEAD_ROWS


@dataclass
class _Task:
    compute: IsolatedCompute
    waiting: list[str] = field(default_factory=list)  # request ids
    run: IsolatedRun | None = None  # under way: its buffer and progress

    @property
    def rows_left(self) -> int:
        return self.compute.rows if self.run is None else self.run.rows_left


@dataclass
class Finished:
    job: Job
    error: BaseException | None = None


def _all_ranks(flags: list[bool]) -> list[bool]:
    return flags


class WorkQueue:
    def __init__(self, pipeline: BlendPipeline, budget: StepBudget,
                 all_ranks: Callable[[list[bool]], list[bool]] = _all_ranks,
                 clock: RowClock | None = None):
        """all_ranks(flags): flags true on every tensor-parallel rank (each rank has its
        own store, and all must compute the same chunks: their passes run collectives)."""
        self.pipeline = pipeline
        self.budget = budget
        self._all_ranks = all_ranks
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # in arrival order
        self._tasks: OrderedDict[object, _Task] = OrderedDict()
        self.clock = clock or RowClock()
        self._yielded = 0  # steps in a row that gave way to starting requests
        self._turn = "isolated"  # which kind a timed step runs when both wait

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
    def step(self, others_running: bool = True, requests_starting: bool = False) -> list[Finished]:
        """Run this step's share of the work; the jobs that finished (or failed). With
        no other request in the step's forward and one request queued, nobody waits for
        this step: that request's work runs whole (a lone request's TTFT; on CPU, in
        time-bounded slices, a 4K infoflow load took over twice as long: each pass
        streams the weights and reads the whole context again). Where steps are timed,
        its misses still run in timed steps: a burst's first request is lone only until
        the next arrives, and would hold it up for all of its misses.
        requests_starting: the step's forward holds requests in their first forward."""
        if not others_running and len(self._jobs) == 1 and (
                self.budget.step_seconds is None or not self._tasks):
            return self._run_isolated(unbounded=True) + self._blend(float("inf"), alone=True)
        # A step whose forward starts new requests runs no blend work (at most
        # yield_steps in a row: a stream of arrivals cannot starve it), so that their
        # first token does not wait for it.
        if requests_starting and self._yielded < self.budget.yield_steps:
            self._yielded += 1
            return []
        self._yielded = 0
        if self.budget.step_seconds is not None:
            return self._timed_step(self.budget.step_seconds)
        return self._run_isolated() + self._blend(self.budget.blend_rows)  # both kinds

    def _timed_step(self, seconds: float) -> list[Finished]:
        """A step bounded in time (passes on the host). Every pass streams all the
        model's weights, a fixed cost per pass (about 40 ms for SmolLM2 in float32 on 2
        cores), so a step runs one kind of work with the step's whole time, alternating
        when both kinds wait."""
        blend_waits = any(not job.missing() for job in self._jobs.values())
        if self._tasks and (not blend_waits or self._turn == "isolated"):
            self._turn = "blend"
            return self._run_isolated(seconds=seconds)
        self._turn = "isolated"
        return self._blend(self.clock.rows_for("blend", seconds, self.budget.blend_rows))

    def _blend(self, budget: float, alone: bool = False) -> list[Finished]:
        """Selection and recompute within `budget` rows, timed for the row clock."""
        ran = [0.0]
        with self.clock.timing("blend", lambda: ran[0]):
            # 1. New requests whose chunks are all present: load, signals, selection,
            #    first come first served, within half the budget (at least one
            #    request), so that a burst of arrivals cannot stall the recomputes.
            num_layers = self.pipeline.adapter.num_layers
            fresh, rows = [], 0.0
            for job in self._jobs.values():
                if job.chosen is None and not job.missing():
                    cost = selection_rows(job, num_layers)
                    if fresh and rows + cost > budget / 2:
                        break
                    fresh.append(job)
                    rows += cost
            finished = self._select(fresh)
            # 2. The rest goes to the recomputes, shared fairly: every request with
            #    tokens left gets an equal share, and what a small one does not need
            #    goes to the others (a small request finishes at once beside a large one).
            active = [j for j in self._jobs.values() if j.rows_left() > 0]
            slices = ([[j, j.rows_left()] for j in active] if alone
                      else fair_shares(active, max(1, int(budget - rows))))
            ran[0] = rows + sum(take for _, take in slices)
            finished += self._recompute(slices)
        return finished

    def _run_isolated(self, unbounded: bool = False, seconds: float | None = None) -> list[Finished]:
        """This step's share of the isolated computes, first come first served: those
        under way go on, new ones start while the budget lasts (a new one is charged
        its segment overhead); one batched pass. A compute larger than what is left
        runs a slice now and the rest in later steps."""
        limit = float("inf") if unbounded else self.clock.rows_for(
            "isolated", seconds, self.budget.isolated_rows)
        takes, rows = [], 0
        for task in self._tasks.values():
            overhead = SEGMENT_OVERHEAD_ROWS if task.run is None else 0
            room = limit - rows - overhead
            if takes and room < 1:
                break
            take = int(min(task.rows_left, max(1, room)))
            takes.append((task, take))
            rows += take + overhead
        if not takes:
            return []
        # The clock counts computed rows only: the overhead rows stand for fixed costs,
        # which it sees as time (small passes look dear per row, so it grows from below).
        with self.clock.timing("isolated", lambda: sum(take for _, take in takes)):
            try:
                done = self._advance_isolated(takes)
            except Exception as e:  # noqa: BLE001 - the waiting requests fall back, the server lives
                logger.exception("kvflow: isolated compute of %d segments failed", len(takes))
                waiting = []
                for task, _ in takes:
                    self._tasks.pop(task.compute.key, None)
                    waiting += task.waiting
                return [self._fail(req_id, e) for req_id in waiting if req_id in self._jobs]
        for task, entry in done:
            del self._tasks[task.compute.key]
            for req_id in task.waiting:
                job = self._jobs.get(req_id)
                if job is not None:
                    self.pipeline.deliver(job, task.compute.key, entry)
        return []

    def _advance_isolated(self, takes: list[tuple[_Task, int]]) -> list[tuple[_Task, object]]:
        """Start the new tasks (a chunk another replica stored since it missed here is
        fetched instead), run the pass, and return the (task, entry) pairs now done."""
        new = [task for task, _ in takes if task.run is None]
        fetched = [self.pipeline.fetch_shared(task.compute) for task in new]
        agreed = self._all_ranks([e is not None for e in fetched])
        done, starting = [], []
        for task, entry, everywhere in zip(new, fetched, agreed):
            if entry is not None and everywhere:
                done.append((task, entry))
            else:
                starting.append(task)
        for task, run in zip(starting, self.pipeline.start_isolated([t.compute for t in starting])):
            task.run = run
        work = [(task, take) for task, take in takes if task.run is not None]  # not fetched
        if work:
            self.pipeline.advance_isolated([(task.run, take) for task, take in work])
        return done + [(task, self.pipeline.finish_isolated(task.run))
                       for task, _ in work if task.run.rows_left == 0]

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

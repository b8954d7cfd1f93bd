"""The worker's work queue (blend/work_queue.py) with a stand-in pipeline: per-step
budgets, misses computed once for every request that waits for them, requests whose
chunks all hit never wait behind misses, the per-request amplification limit, aborts,
and failures that fail only the requests they touch."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vllm_kvflow.blend.pipeline import IsolatedCompute, LoadPlan, LoadResult, Segment
from vllm_kvflow.blend.selection import method
from vllm_kvflow.blend.work_queue import SEGMENT_OVERHEAD_ROWS, LoadRefused, StepBudget, WorkQueue


@dataclass
class FakeJob:
    plan: LoadPlan
    method: object
    result: LoadResult = field(default_factory=LoadResult)
    segments: list = field(default_factory=list)
    chosen: object = None

    @property
    def req_id(self):
        return self.plan.req_id

    def missing(self):
        return [s for s in self.segments if s.entry is None]

    def recompute_rows(self):
        return self.plan.ratio_rows


class FakePipeline:
    """Chunks are strings; the store is a set; 'computing' a chunk puts it there."""

    def __init__(self, stored=(), fail_keys=()):
        self.store = set(stored)
        self.fail_keys = set(fail_keys)
        self.computed: list[list[str]] = []  # one list per isolated pass
        self.blended: list[list[str]] = []  # one list per recompute pass
        self.adapter = type("A", (), {"num_layers": 30})()

    def resolve(self, job):
        job.segments = [Segment(0, len(c), True, c, tuple(c.encode()), (1,), False, 0,
                                "kv" if c in self.store else None) for c in job.plan.chunk_names]
        return [self.isolated_compute_for(s) for s in job.segments if s.entry is None]

    @staticmethod
    def isolated_compute_for(seg):
        return IsolatedCompute(seg.key, seg.token_ids, seg.sink, seg.is_chunk)

    def compute_isolated_batch(self, tasks):
        keys = [t.key for t in tasks]
        if self.fail_keys & set(keys):
            raise RuntimeError("boom")
        self.computed.append(keys)
        self.store.update(keys)
        return ["kv"] * len(tasks)

    def deliver(self, job, key, entry):
        for s in job.segments:
            if s.key == key:
                s.entry = entry

    def load(self, job):
        if job.req_id.startswith("bad-load"):
            raise RuntimeError("bad load")

    def select_batch(self, jobs):
        pass

    def recompute_batch(self, jobs):
        self.blended.append([j.req_id for j in jobs])


def job(req_id, chunks, rows=100, method_name="none", prompt_len=1000):
    plan = LoadPlan(req_id, [0] * prompt_len, [(0, 1)], (1, 2), method_name, 0.15, "", 0, [1])
    plan.chunk_names, plan.ratio_rows = chunks, rows
    return FakeJob(plan, method(method_name))


def chunk(name, n=200):
    return name.ljust(n, ".")  # a chunk of n "tokens"


def test_all_hit_requests_never_wait_behind_misses():
    pipe = FakePipeline(stored={chunk("a"), chunk("b")})
    q = WorkQueue(pipe, StepBudget(blend_rows=10_000, isolated_rows=250))
    q.submit(job("miss", [chunk("x"), chunk("y"), chunk("z")]))
    q.submit(job("hit", [chunk("a"), chunk("b")]))
    done = [f.job.req_id for f in q.step()]
    assert done == ["hit"]  # first step: the hit is blended, one miss computed
    assert pipe.computed == [[chunk("x")]]  # the isolated budget admits one 232-row compute
    steps = 1
    while len(q):
        done += [f.job.req_id for f in q.step()]
        steps += 1
    assert done == ["hit", "miss"] and steps == 3


def test_a_chunk_missed_by_many_requests_is_computed_once():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=10_000, isolated_rows=10_000))
    for i in range(5):
        q.submit(job(f"r{i}", [chunk("shared"), chunk(f"own{i}")]))
    finished = q.step()
    assert sorted(f.job.req_id for f in finished) == [f"r{i}" for i in range(5)]
    assert sum(keys.count(chunk("shared")) for keys in pipe.computed) == 1
    assert pipe.blended == [[f"r{i}" for i in range(5)]]  # one batched pass


def test_blend_budget_bounds_each_step_but_admits_one():
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=250, isolated_rows=1000))
    for i in range(5):
        q.submit(job(f"r{i}", [chunk("a")], rows=100))
    q.submit(job("huge", [chunk("a")], rows=5000))
    sizes = []
    while len(q):
        q.step()
        sizes.append(len(pipe.blended[-1]))
    assert sizes == [2, 2, 1, 1]  # 2 x 100 rows fit 250; 'huge' alone, over budget


def test_isolated_work_per_request_is_limited():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1000, max_isolated_per_prompt_token=4))
    tiny = [f"{i:04d}" for i in range(200)]  # 200 one-token-ish chunks over a 100-token prompt
    with pytest.raises(LoadRefused) as e:
        q.submit(job("amplify", tiny, prompt_len=100))
    assert e.value.reason == "isolated-compute-limit" and len(q) == 0
    rows = 3 * (chunk("a").__len__() + 1 + SEGMENT_OVERHEAD_ROWS)
    q.submit(job("fine", [chunk("a"), chunk("b"), chunk("c")], prompt_len=rows // 4 + 1))


def test_cancel_drops_the_request_and_work_only_it_waits_for():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1))
    q.submit(job("keep", [chunk("shared")]))
    q.submit(job("gone", [chunk("shared"), chunk("mine")]))
    assert q.cancel("gone").req_id == "gone" and q.cancel("gone") is None
    while len(q):
        q.step()
    assert chunk("mine") not in pipe.store and chunk("shared") in pipe.store


def test_failures_fail_only_the_requests_they_touch():
    pipe = FakePipeline(stored={chunk("ok")}, fail_keys={chunk("poison")})
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1))
    q.submit(job("waits-on-poison", [chunk("poison")]))
    q.submit(job("bad-load", [chunk("ok")]))
    q.submit(job("fine", [chunk("ok")]))
    results = {}
    while len(q):
        results.update({f.job.req_id: f.error for f in q.step()})
    assert isinstance(results["waits-on-poison"], RuntimeError)
    assert isinstance(results["bad-load"], RuntimeError) and results["fine"] is None


def test_tensor_parallel_ranks_agree_on_hits():
    """A chunk this rank holds but another lacks is computed here too."""
    pipe = FakePipeline(stored={chunk("a"), chunk("b")})
    q = WorkQueue(pipe, StepBudget(1000, 1000), all_ranks=lambda flags: [False] + flags[1:])
    q.submit(job("r", [chunk("a"), chunk("b")]))
    q.step()
    assert pipe.computed == [[chunk("a")]]

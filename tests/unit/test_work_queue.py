"""The worker's work queue (blend/work_queue.py) with a stand-in pipeline: per-step
budgets, misses computed once for every request that waits for them, requests whose
chunks all hit never wait behind misses, a large recompute spread over steps while
smaller requests go on, the per-request amplification limit, aborts, and failures that
fail only the requests they touch. And, with a toy decoder, that recomputing a
selection in position-ordered slices equals recomputing it at once."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from toy_decoder import Toy
from vllm_kvflow.blend.pipeline import (BlendPipeline, IsolatedCompute, IsolatedRun, LoadPlan,
                                        LoadResult, Segment)
from vllm_kvflow.blend.selection import method
from vllm_kvflow.blend.work_queue import (SEGMENT_OVERHEAD_ROWS, LoadRefused, RowClock, StepBudget,
                                          WorkQueue)


@dataclass
class FakeJob:
    plan: LoadPlan
    method: object
    result: LoadResult = field(default_factory=LoadResult)
    segments: list = field(default_factory=list)
    chosen: object = None
    recomputed: int = 0

    @property
    def req_id(self):
        return self.plan.req_id

    def missing(self):
        return [s for s in self.segments if s.entry is None]

    def rows_left(self):
        return 0 if self.chosen is None else len(self.chosen) - self.recomputed


class FakePipeline:
    """Chunks are strings; the store is a set; 'computing' a chunk puts it there. A job
    selects plan.selected_rows rows (its question costs plan.question rows)."""

    def __init__(self, stored=(), fail_keys=()):
        self.store = set(stored)
        self.fail_keys = set(fail_keys)
        self.computed: list[list[str]] = []  # one list per isolated pass
        self.selected: list[list[str]] = []  # one list per selection pass
        self.passes: list[list[tuple[str, int, int]]] = []  # one list per recompute pass
        self.adapter = type("A", (), {"num_layers": 30})()

    def resolve(self, job):
        job.segments = [Segment(0, len(c), True, c, tuple(c.encode()), (1,), False, 0,
                                "kv" if c in self.store else None) for c in job.plan.chunk_names]
        return [self.isolated_compute_for(s) for s in job.segments if s.entry is None]

    @staticmethod
    def isolated_compute_for(seg):
        return IsolatedCompute(seg.key, seg.token_ids, seg.sink, seg.is_chunk)

    def fetch_shared(self, task):
        """What another replica stored meanwhile (self.shared)."""
        return "kv" if task.key in getattr(self, "shared", ()) else None

    def start_isolated(self, tasks):
        return [IsolatedRun(task, torch.zeros(task.rows), kv=None) for task in tasks]

    def advance_isolated(self, takes):
        """One isolated pass: self.computed gets its keys, self.isolated_rows its rows."""
        keys = [run.task.key for run, _ in takes]
        if self.fail_keys & set(keys):
            raise RuntimeError("boom")
        self.computed.append(keys)
        self.isolated_rows = getattr(self, "isolated_rows", []) + [sum(t for _, t in takes)]
        for run, take in takes:
            run.done += take

    def finish_isolated(self, run):
        self.store.add(run.task.key)
        return "kv"

    def deliver(self, job, key, entry):
        for s in job.segments:
            if s.key == key:
                s.entry = entry

    def load(self, job):
        if job.req_id.startswith("bad-load"):
            raise RuntimeError("bad load")

    def select_batch(self, jobs):
        self.selected.append([j.req_id for j in jobs])
        for j in jobs:
            j.chosen = list(range(j.plan.selected_rows))

    def recompute_slices(self, slices):
        self.passes.append([(j.req_id, a, b) for j, a, b in slices])

    # The real sequences of a whole load and of isolated computes at once, over the
    # stand-in steps above.
    run_whole = BlendPipeline.run_whole
    compute_isolated_batch = BlendPipeline.compute_isolated_batch
    _compute_runs = BlendPipeline._compute_runs


def job(req_id, chunks, rows=100, method_name="infoflow", prompt_len=1000):
    # the question is one token: infoflow's signal costs 0.75 rows
    plan = LoadPlan(req_id, [0] * prompt_len, [(0, 1)], (1, 2), method_name, 0.15, "", 0, [1])
    plan.chunk_names, plan.selected_rows = chunks, rows
    return FakeJob(plan, method(method_name))


def chunk(name, n=200):
    return name.ljust(n, ".")  # a chunk of n "tokens"


def drain(q):
    done = []
    while len(q):
        done += [f.job.req_id for f in q.step()]
    return done


def test_all_hit_requests_never_wait_behind_misses():
    pipe = FakePipeline(stored={chunk("a"), chunk("b")})
    q = WorkQueue(pipe, StepBudget(blend_rows=10_000, isolated_rows=250))
    q.submit(job("miss", [chunk("x"), chunk("y"), chunk("z")]))
    q.submit(job("hit", [chunk("a"), chunk("b")]))
    done = [f.job.req_id for f in q.step()]
    assert done == ["hit"]  # first step: the hit is blended, one miss computed
    assert pipe.computed == [[chunk("x")]]  # the isolated budget admits one 233-row compute
    assert drain(q) == ["miss"] and len(pipe.computed) == 3


def test_a_chunk_missed_by_many_requests_is_computed_once():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=10_000, isolated_rows=10_000))
    for i in range(5):
        q.submit(job(f"r{i}", [chunk("shared"), chunk(f"own{i}")]))
    finished = q.step()
    assert sorted(f.job.req_id for f in finished) == [f"r{i}" for i in range(5)]
    assert sum(keys.count(chunk("shared")) for keys in pipe.computed) == 1
    assert pipe.selected == [[f"r{i}" for i in range(5)]]  # one batched selection
    assert pipe.passes == [[(f"r{i}", 0, 100) for i in range(5)]]  # one batched recompute


def test_a_large_recompute_spreads_over_steps_while_small_requests_go_on():
    """Budget 300 rows: 'huge' (1000 rows) recomputes in position-ordered slices over
    steps; 'small', arriving later, is selected at once and shares the rows fairly, so
    it finishes in its first step instead of after 'huge'."""
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=300, isolated_rows=1000))
    q.submit(job("huge", [chunk("a")], rows=1000))
    assert q.step() == [] and pipe.passes[-1] == [("huge", 0, 299)]  # 0.75 row of scoring
    q.submit(job("small", [chunk("a")], rows=50))
    assert [f.job.req_id for f in q.step()] == ["small"]
    assert pipe.passes[-1] == [("huge", 299, 548), ("small", 0, 50)]  # 249 + 50 + 0.75
    assert drain(q) == ["huge"]
    slices = [s for p in pipe.passes for s in p if s[0] == "huge"]
    assert slices[0][1] == 0 and slices[-1][2] == 1000 and all(
        s1[2] == s2[1] for s1, s2 in zip(slices, slices[1:]))  # position order, complete
    assert all(sum(b - a for _, a, b in p) <= 300 for p in pipe.passes)


def test_fair_shares_fill_from_the_smallest():
    from vllm_kvflow.blend.work_queue import fair_shares

    jobs = [job(n, [], rows=r) for n, r in (("a", 500), ("b", 20), ("c", 90))]
    for j in jobs:
        j.chosen = list(range(j.plan.selected_rows))
    got = {j.req_id: take for j, take in fair_shares(jobs, 300)}
    assert got == {"b": 20, "c": 90, "a": 190}
    got = {j.req_id: take for j, take in fair_shares(jobs, 2)}
    assert got == {"a": 1, "b": 1}  # fewer rows than requests: the oldest first


def test_blend_budget_bounds_each_steps_rows():
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=250, isolated_rows=1000))
    for i in range(5):
        q.submit(job(f"r{i}", [chunk("a")], rows=100))
    drain(q)
    assert all(sum(b - a for _, a, b in p) <= 250 for p in pipe.passes)
    assert sum(b - a for p in pipe.passes for _, a, b in p) == 500


def test_isolated_work_per_request_is_limited():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1000, max_isolated_per_prompt_token=4))
    tiny = [f"{i:04d}" for i in range(200)]  # 200 tiny chunks over a 100-token prompt
    with pytest.raises(LoadRefused) as e:
        q.submit(job("amplify", tiny, prompt_len=100))
    assert e.value.reason == "isolated-compute-limit" and len(q) == 0
    rows = 3 * (len(chunk("a")) + 1 + SEGMENT_OVERHEAD_ROWS)
    q.submit(job("fine", [chunk("a"), chunk("b"), chunk("c")], prompt_len=rows // 4 + 1))


def test_cancel_drops_the_request_and_work_only_it_waits_for():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1))
    q.submit(job("keep", [chunk("shared")]))
    q.submit(job("gone", [chunk("shared"), chunk("mine")]))
    assert q.cancel("gone").req_id == "gone" and q.cancel("gone") is None
    drain(q)
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


def test_recompute_in_position_ordered_slices_equals_recompute_at_once():
    """The exactness of spreading a recompute over steps, on a toy decoder: the selected
    tokens recomputed in three slices leave the same KV as one pass."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import DenseKV

    torch.manual_seed(0)
    ex = LayerwiseExecutor(Toy(4, 2, 16))
    n = 60
    ids = torch.randint(0, 1000, (n,))
    base = DenseKV(torch.randn(3, n, 2, 16), torch.randn(3, n, 2, 16))  # 'reused' KV
    chosen = torch.tensor(sorted(torch.randperm(n)[:25].tolist()))
    once = DenseKV(base.keys.clone(), base.values.clone())
    ex.prefill(ids[chosen], chosen, once)
    sliced = DenseKV(base.keys.clone(), base.values.clone())
    for a, b in ((0, 7), (7, 8), (8, 25)):
        ex.prefill(ids[chosen[a:b]], chosen[a:b], sliced)
    torch.testing.assert_close(sliced.keys, once.keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(sliced.values, once.values, rtol=0, atol=1e-6)
    assert not torch.allclose(once.keys[:, chosen], base.keys[:, chosen])  # it recomputed


def test_a_lone_request_runs_whole_when_nobody_else_runs():
    """No other request in the step's forward and one request queued: nobody waits for
    the step, so its misses and its recompute run whole (its TTFT alone); with another
    request running, the same request is bounded."""
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=100, isolated_rows=100))
    q.submit(job("alone", [chunk("x"), chunk("y")], rows=1000))
    assert [f.job.req_id for f in q.step(others_running=False)] == ["alone"]
    assert pipe.computed == [[chunk("x"), chunk("y")]] and pipe.passes == [[("alone", 0, 1000)]]
    q.submit(job("busy", [chunk("x")], rows=1000))
    assert q.step(others_running=True) == [] and pipe.passes[-1] == [("busy", 0, 99)]


def test_a_synchronous_load_runs_whole_at_once_beside_the_queue():
    """run_now: the job's misses (a chunk declared twice computed once), selection and
    whole recompute at once, outside the step budgets, leaving the queue as it was."""
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=10, isolated_rows=10))
    q.submit(job("queued", [chunk("q")]))
    done = q.run_now(job("sync", [chunk("a"), chunk("x"), chunk("x")], rows=500))
    assert done.error is None and done.job.req_id == "sync"
    assert pipe.computed == [[chunk("x")]] and pipe.passes == [[("sync", 0, 500)]]
    assert len(q) == 1  # the queued job is untouched


def test_a_chunk_another_replica_stored_meanwhile_is_fetched_not_computed():
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=1000, isolated_rows=1000))
    q.submit(job("r", [chunk("x"), chunk("y")]))
    pipe.shared = {chunk("x")}  # the other replica computed x after r missed it
    assert [f.job.req_id for f in q.step()] == ["r"]
    assert pipe.computed == [[chunk("y")]]


def test_a_long_isolated_compute_runs_in_slices_within_the_budget():
    """A 400-token miss with 150 isolated rows per step: computed over several steps in
    slices (the first pays the segment overhead), while an all-hit request is blended
    in the first step; the missing request finishes once its chunk is whole."""
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=10_000, isolated_rows=150))
    q.submit(job("miss", [chunk("long", 400)]))
    q.submit(job("hit", [chunk("a")]))
    assert [f.job.req_id for f in q.step()] == ["hit"]
    assert pipe.isolated_rows == [150 - SEGMENT_OVERHEAD_ROWS]
    assert drain(q) == ["miss"]
    assert pipe.isolated_rows == [118, 150, 133] and chunk("long", 400) in pipe.store


def test_isolated_computes_in_slices_equal_one_pass():
    """The exactness of slicing an isolated compute, on a toy decoder: [sink][chunk]
    computed in three slices of consecutive positions leaves the same KV as one pass."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import DenseKV

    torch.manual_seed(0)
    ex = LayerwiseExecutor(Toy(4, 2, 16))
    n = 50
    ids = torch.randint(0, 1000, (n,))
    once = DenseKV.empty(3, n, 2, 16, torch.float32, "cpu")
    ex.prefill(ids, torch.arange(n), once)
    sliced = DenseKV.empty(3, n, 2, 16, torch.float32, "cpu")
    for a, b in ((0, 1), (1, 20), (20, n)):
        ex.prefill(ids[a:b], torch.arange(a, b), sliced)
    torch.testing.assert_close(sliced.keys, once.keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced.values, once.values, rtol=0, atol=1e-5)


class TimedPipeline(FakePipeline):
    """Passes that take time on a fake clock: a fixed cost plus a cost per row."""

    def __init__(self, clock, fixed_s=0.01, per_row_s=0.002, **kw):
        super().__init__(**kw)
        self.clock, self.fixed_s, self.per_row_s = clock, fixed_s, per_row_s

    def advance_isolated(self, takes):
        super().advance_isolated(takes)
        self.clock.t += self.fixed_s + self.per_row_s * sum(t for _, t in takes)

    def recompute_slices(self, slices):
        super().recompute_slices(slices)
        self.clock.t += self.fixed_s + self.per_row_s * sum(b - a for _, a, b in slices)


def test_a_time_budget_bounds_each_steps_blend_work():
    """step_seconds = 0.2 on a machine where a pass costs 10 ms + 2 ms per row: no
    step's blend work takes much over 0.2 s (the row budgets alone allow 0.6 s), each
    step runs one kind, alternating while both wait, and all of the work gets done."""
    fake = type("Clock", (), {"t": 0.0})()
    pipe = TimedPipeline(fake, stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=300, isolated_rows=300, step_seconds=0.2),
                  clock=RowClock(now=lambda: fake.t))
    for i in range(4):
        q.submit(job(f"hit{i}", [chunk("a")], rows=150))
        q.submit(job(f"miss{i}", [chunk(f"m{i}", 150)], rows=150))
    steps, kinds, done = [], [], []
    while len(q):
        t0, isolated, recomputes = fake.t, len(pipe.computed), len(pipe.passes)
        done += [f.job.req_id for f in q.step()]
        steps.append(fake.t - t0)
        kinds.append(("isolated" if len(pipe.computed) > isolated else "")
                     + ("blend" if len(pipe.passes) > recomputes else ""))
    assert sorted(done) == sorted([f"hit{i}" for i in range(4)] + [f"miss{i}" for i in range(4)])
    assert kinds[:4] == ["isolated", "blend"] * 2
    assert steps[0] < 0.2  # unmeasured: a small first pass (RowClock.FIRST_ROWS)
    assert max(steps) <= 0.3, steps  # the clock adapts: never the 0.6 s of the rows
    assert set(kinds) == {"isolated", "blend"} and len(steps) < 40  # 3.6 s of rows: 18 at best


@pytest.mark.parametrize("yield_steps,expected", [(1, [0, 1, 0, 1, 0, 1]),
                                                   (2, [0, 0, 1, 0, 0, 1]),
                                                   (0, [1, 1, 1, 1, 1, 1])])
def test_a_step_that_starts_requests_gives_way_at_most_yield_steps_in_a_row(yield_steps, expected):
    """A step whose forward starts new requests runs no blend work, so their first
    token is not late; after yield_steps such steps in a row one runs work even if it
    starts requests too (blend work cannot be starved by a stream of arrivals). With or
    without a time budget."""
    for seconds in (0.2, None):
        pipe = FakePipeline(stored={chunk("a")})
        q = WorkQueue(pipe, StepBudget(blend_rows=10, isolated_rows=10, step_seconds=seconds,
                                       yield_steps=yield_steps))
        q.submit(job("r", [chunk("a")], rows=1000))
        ran = []
        for _ in range(6):
            before = len(pipe.selected) + len(pipe.passes)
            q.step(requests_starting=True)
            ran.append(int(len(pipe.selected) + len(pipe.passes) > before))
        assert ran == expected, (seconds, ran)


def test_a_step_without_starting_requests_resets_the_run_of_yields():
    pipe = FakePipeline(stored={chunk("a")})
    q = WorkQueue(pipe, StepBudget(blend_rows=10, isolated_rows=10, yield_steps=2))
    q.submit(job("r", [chunk("a")], rows=1000))
    ran = []
    for starting in (True, False, True, True, True):
        before = len(pipe.selected) + len(pipe.passes)
        q.step(requests_starting=starting)
        ran.append(int(len(pipe.selected) + len(pipe.passes) > before))
    assert ran == [0, 1, 0, 0, 1]


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_the_yield_setting_must_be_a_whole_number(value):
    from vllm_kvflow.config import KVFlowConfig

    with pytest.raises(ValueError, match="max_yield_steps"):
        KVFlowConfig(max_yield_steps=value)


@pytest.mark.parametrize("value", [0, -5, True, "100"])
def test_the_step_time_setting_must_be_a_positive_number_or_null(value):
    from vllm_kvflow.config import KVFlowConfig

    with pytest.raises(ValueError, match="max_blend_ms_per_step"):
        KVFlowConfig(max_blend_ms_per_step=value)
    assert KVFlowConfig(max_blend_ms_per_step=None).max_blend_ms_per_step is None


def test_steps_are_timed_on_cpu_engines_of_one_rank_only():
    import types

    from vllm_kvflow.config import KVFlowConfig
    from vllm_kvflow.connector.worker import step_budget, timed_steps

    def engine(device, tp=1):
        return types.SimpleNamespace(device_config=types.SimpleNamespace(device_type=device),
                                     parallel_config=types.SimpleNamespace(tensor_parallel_size=tp),
                                     scheduler_config=types.SimpleNamespace(max_num_batched_tokens=4096))

    config = KVFlowConfig(max_blend_ms_per_step=150)
    assert timed_steps(config, engine("cpu"))
    assert not timed_steps(config, engine("cuda")) and not timed_steps(config, engine("cpu", tp=2))
    assert not timed_steps(KVFlowConfig(max_blend_ms_per_step=None), engine("cpu"))
    assert step_budget(config, engine("cpu")).step_seconds == 0.15
    budget = step_budget(config, engine("cuda"))
    # One GPU rank: the blend work runs beside the forward (blend_stream "side", the
    # default) and takes 3/16 of the step's tokens; on vLLM's stream an eighth.
    assert budget.step_seconds is None and budget.blend_rows == budget.isolated_rows == 768
    main = step_budget(KVFlowConfig(blend_stream="main"), engine("cuda"))
    assert main.blend_rows == main.isolated_rows == 512
    assert step_budget(config, engine("cuda", tp=2)).blend_rows == 512  # inline on every rank


def test_a_lone_requests_misses_run_in_timed_steps_and_its_blend_whole():
    """Timed steps: a lone request's misses are computed in bounded steps (a request
    arriving meanwhile waits for one of them, not for all its misses); once they are
    in, its blend work runs whole in one step. Without a time budget it all runs whole."""
    pipe = FakePipeline()
    q = WorkQueue(pipe, StepBudget(blend_rows=100, isolated_rows=100, step_seconds=0.2))
    q.submit(job("lone", [chunk("x"), chunk("y")], rows=1000))
    steps = 0
    while len(q):
        q.step(others_running=False)
        steps += 1
    assert len(pipe.computed) > 1 and pipe.passes == [[("lone", 0, 1000)]]
    assert steps == len(pipe.computed) + 1
    whole = FakePipeline()
    q = WorkQueue(whole, StepBudget(blend_rows=100, isolated_rows=100))
    q.submit(job("lone", [chunk("x"), chunk("y")], rows=1000))
    assert len(q.step(others_running=False)) == 1 and len(whole.computed) == 1

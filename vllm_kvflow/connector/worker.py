"""Worker side: each engine step, queue the step's new loads and run a bounded share of
the blend work (blend/work_queue.py: store misses computed in isolation, then loads,
signals, selections and recomputes batched over the requests that are ready), and
report the requests whose KV is in place through get_finished. On GPU engines of one
rank the blend work may run on a CUDA stream of its own, beside the step's forward, a
load then reported once that stream has passed it (blend_stream, blend/side_stream.py).

A load that fails marks the request's blocks as failed, so vLLM recomputes them
(kv_load_failure_policy="recompute"): the request falls back to full prefill rather
than decoding from half-written KV.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from typing import Any

import torch

from vllm_kvflow.blend.executor import LayerwiseExecutor
from vllm_kvflow.blend.model_adapter import adapter_for
from vllm_kvflow.blend.paged import (
    PackedPagedKV,
    PagedKV,
    layout_for_backend,
    packed_pages,
    page_order,
    split_kv_cache,
)
from vllm_kvflow.blend.host_ints import device_ints
from vllm_kvflow.blend.pipeline import BlendPipeline, LoadPlan
from vllm_kvflow.blend.side_stream import BlendStream
from vllm_kvflow.blend.stall_watch import StallWatch
from vllm_kvflow.blend.step_log import StepLog, device_calls_of
from vllm_kvflow.blend.work_queue import Finished, LoadRefused, StepBudget, WorkQueue
from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.connector.metadata import KVFlowConnectorMetadata, KVFlowWorkerMetadata
from vllm_kvflow.store.build import build_store

logger = logging.getLogger("vllm_kvflow")


def _watched(method):
    """A call from vLLM, seen by the stall report (blend/stall_watch.py): an engine step
    under way, then one finished."""

    @functools.wraps(method)
    def call(self, *args):
        if self._watch is None:
            return method(self, *args)
        self._watch.enter()
        try:
            return method(self, *args)
        finally:
            self._watch.leave()

    return call


class KVFlowWorker:
    _watch: StallWatch | None = None  # the stall report (stall_report_s); None: off

    def __init__(self, config: KVFlowConfig, vllm_config):
        self.config = config
        self.vllm_config = vllm_config
        self.store = build_store(config, device_type(vllm_config),
                                 store_identity(vllm_config))
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._pipeline: BlendPipeline | None = None
        self._queue: WorkQueue | None = None
        self._views: dict | None = None
        # Per request: its stats (a finished load's result, read in build_worker_meta:
        # its GPU timings would otherwise wait for the load) and host-side extras.
        self._results: dict[str, tuple[Finished | dict, dict[str, Any]]] = {}
        self._held: dict[str, tuple[Finished | dict, dict[str, Any]]] = {}  # one step
        self._done: set[str] = set()  # loads finished (or dropped) since get_finished
        self._failed_blocks: set[int] = set()
        self._steps = 0
        self._stream = BlendStream.for_device(device_type(vllm_config), separate_blend_stream(
            config, vllm_config))
        self._step_log = StepLog(config.log_steps_every_s,
                                 device_calls=device_calls_of(device_type(vllm_config)))
        self._watch = StallWatch(config.stall_report_s, self._pending).start() \
            if config.stall_report_s else None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """At engine start: the caches, then the pipeline and its kernels, compiled now
        rather than in the first requests' TTFT (a failure is logged; the first load
        then builds the pipeline again and reports its own error)."""
        self._kv_caches = dict(kv_caches)
        self._views = None
        t0 = time.perf_counter()
        try:
            self._ready()
            views = self._views
            if views["cls"] is PagedKV:
                self._pipeline.warm_up(views["keys"], views["values"], views["block_size"],
                                       recompute_rows=self._queue.budget.blend_rows,
                                       isolated_rows=self._queue.budget.isolated_rows)
        except Exception as e:  # noqa: BLE001 - never fail the engine's start
            logger.warning("kvflow: warm-up at engine start failed (%s); kernels compile on first use", e)
            self._pipeline = self._queue = None
            return
        logger.info("kvflow: pipeline ready in %.1f s (kernels compiled, %d pass graphs captured)",
                    time.perf_counter() - t0, self._pipeline.captured_graphs())

    def _ready(self) -> BlendPipeline:
        if self._pipeline is None:
            from vllm_kvflow.patches import model_hook

            model = model_hook.current_model()
            adapter = adapter_for(model)
            model_config = self.vllm_config.model_config
            sink = self.config.sink_token_ids
            if sink is None:
                bos = getattr(model_config.hf_config, "bos_token_id", None)
                if bos is None:
                    raise RuntimeError("kvflow: the model has no BOS token; set sink_token_ids")
                sink = (int(bos),)
            model_id = f"{model_config.model}|{model_config.dtype}"
            self._pipeline = BlendPipeline(LayerwiseExecutor(adapter), self.store, self.config,
                                           model_id, sink, max_model_len=model_config.max_model_len)
            from vllm_kvflow.patches.parallel import all_ranks

            self._queue = WorkQueue(self._pipeline, step_budget(self.config, self.vllm_config), all_ranks)
        if self._views is None:
            self._views = self._cache_views()
        return self._pipeline

    def _cache_views(self) -> dict:
        """Per-layer key/value views of the paged cache, and how to build a PagedKV."""
        adapter = self._pipeline.adapter
        head_dim = adapter.shape.head_dim
        first = adapter.attn_modules[0]
        layout = layout_for_backend(first.attn_backend.get_name(), self._kv_caches[first.layer_name])
        split = (lambda c: packed_pages(c, head_dim)) if layout == "cpu" else (
            lambda c: split_kv_cache(c, layout, head_dim))
        pairs = [split(self._kv_caches[m.layer_name]) for m in adapter.attn_modules]
        views = {"keys": [k for k, _ in pairs], "values": [v for _, v in pairs]}
        if layout == "cpu":
            from vllm_kvflow.patches.cpu_attn_layout import (
                cpu_cache_writer,
                cpu_op_caches,
                page_permutation,
            )

            cache = self._kv_caches[first.layer_name]
            block_size = cache.shape[2]
            k_index, v_index = (i.view(block_size, head_dim) for i in
                                page_permutation(first.isa, cache.dtype, block_size, head_dim))
            views.update(cls=PackedPagedKV, block_size=block_size,
                         extra={"key_index": k_index, "value_index": v_index,
                                "key_order": page_order(k_index), "value_order": page_order(v_index),
                                "write_op": cpu_cache_writer(first.isa),
                                "op_caches": [cpu_op_caches(self._kv_caches[m.layer_name])
                                              for m in adapter.attn_modules]})
        else:
            views.update(cls=PagedKV, block_size=pairs[0][0].shape[1], extra={})
        return views

    def _paged_kv(self, block_ids: list[int], device) -> PagedKV:
        v = self._views
        return v["cls"](v["keys"], v["values"],
                        device_ints(block_ids, device),
                        block_size=v["block_size"], **v["extra"])

    @_watched
    def start_load_kv(self, metadata: KVFlowConnectorMetadata) -> None:
        """Run this step's synchronous loads whole (the forward queued next reads them),
        queue its asynchronous ones, then run the step's share of the queue, unless the
        previous step's share still runs on a blend stream of its own."""
        started = self._step_log.begin()
        worked = bool(metadata.loads)
        self._stream.run_ready()
        with _sync_checked(), self._stream.queued():
            for plan in metadata.loads:
                self._submit(plan)
            if self._queue is not None and len(self._queue) and not self._stream.busy():
                worked = True
                t0 = time.perf_counter()
                self._steps += 1
                with _maybe_profiled(f"step{self._steps:06d}"):
                    finished = self._queue.step(others_running=metadata.scheduled_tokens > 0,
                                                requests_starting=metadata.starting > 0)
                host_s = time.perf_counter() - t0
                for item in finished:
                    self._finish(item.job.plan, item, host_s)
        if any(plan.sync for plan in metadata.loads):
            self._stream.join()
        self._stream.run_ready()
        self._step_log.end(started, worked)

    def _submit(self, plan: LoadPlan) -> None:
        try:
            pipeline = self._ready()
            job = pipeline.new_job(plan, self._paged_kv(plan.block_ids, pipeline.adapter.device))
            if plan.sync:
                t0 = time.perf_counter()
                self._finish(plan, self._queue.run_now(job), time.perf_counter() - t0)
            else:
                self._queue.submit(job)
        except LoadRefused as e:
            logger.warning("kvflow: load for %s refused, recomputing: %s", plan.req_id, e)
            self._finish(plan, {"error": str(e), "fallback": e.reason}, 0.0)
        except Exception as e:  # noqa: BLE001 - any failure must degrade, not crash
            logger.exception("kvflow: load for %s could not start", plan.req_id)
            self._finish(plan, Finished(None, e), 0.0)

    def _finish(self, plan: LoadPlan, outcome: Finished | dict, host_s: float) -> None:
        """Record a load's outcome once its GPU work is done (a synchronous load's at
        once: this step's forward is queued after it); a failed one marks its blocks
        for vLLM to recompute."""
        if plan.sync:
            self._record(plan, outcome, host_s)
        else:
            self._stream.after_queued(lambda: self._record(plan, outcome, host_s))

    def _record(self, plan: LoadPlan, outcome: Finished | dict, host_s: float) -> None:
        error = outcome.error if isinstance(outcome, Finished) else outcome.get("error")
        if error is not None:
            if isinstance(error, BaseException):
                # The traceback is logged where the failure was caught (work queue, _submit).
                logger.error("kvflow: load for %s failed, recomputing: %s", plan.req_id, error)
                outcome = {"error": f"{type(error).__name__}: {error}"}
            self._failed_blocks.update(plan.block_ids)
        self._results[plan.req_id] = (outcome, {"load_s": host_s, "store": self.store.stats()})
        if not plan.sync:  # vLLM waits for an asynchronous load's report (get_finished)
            self._done.add(plan.req_id)

    @_watched
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(sending, receiving): the requests whose loads finished since the last call,
        and aborted requests whose loads were dropped (vLLM holds their blocks until
        they are reported here), each once the blend work queued before it has run on
        the GPU, so no forward reads a load's KV, or writes a reused block, before it
        (blend/side_stream.py)."""
        if self._queue is not None:
            for req_id in finished_req_ids or ():
                if self._queue.cancel(req_id) is not None:
                    self._stream.after_queued(lambda req_id=req_id: self._done.add(req_id))
        self._stream.run_ready()
        done, self._done = self._done, set()
        return None, done or None

    def _pending(self) -> str | None:
        """What blend work is pending, for the stall report; None: nothing (stats not yet
        sent are no work: an engine that has gone idle may hold the last ones)."""
        parts = []
        if self._queue is not None and len(self._queue):
            parts.append(f"{len(self._queue)} loads queued")
        if self._stream.pending:
            parts.append(f"{self._stream.pending} actions deferred behind the blend stream")
        if not parts:
            return None
        if self._stream.separate:
            # Both streams busy for that long: the GPU itself has stopped; only the blend
            # stream: its work; neither: the host waits on something else. (vLLM's work is
            # on the default stream but under "background", patches/forward_priority.py.)
            vllm_busy = not torch.cuda.default_stream(self._stream.stream.device).query()
            parts.append("blend stream " + ("busy (its GPU work has not finished)"
                                            if self._stream.busy() else "idle"))
            parts.append("vLLM's default stream " + ("busy" if vllm_busy else "idle"))
        return "; ".join(parts)

    def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self.store.close()  # queued disk writes land before the process goes

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    @_watched
    def build_worker_meta(self) -> KVFlowWorkerMetadata | None:
        """The stats of the loads finished since the last call. On GPU an asynchronous
        load's stats are held one step: its phase timings are CUDA events, and reading
        them now would make the host wait for the load's GPU work, which this step's
        forward is queued behind, instead of preparing the next step (a step later that
        work is done). The request's first token comes from a later step's forward
        anyway (get_finished has just reported its load), so its stats still reach the
        scheduler no later than that token: in the same update at the latest, which the
        scheduler side handles (a request that stops on its first token). Every
        tensor-parallel rank holds the same ones. A synchronous load's forward is this
        very step's: its stats go now."""
        send, self._held = self._held, {}
        for req_id, (outcome, extra) in self._results.items():
            if _timed_on_gpu_async(outcome):
                self._held[req_id] = (outcome, extra)
            else:
                send[req_id] = (outcome, extra)
        self._results = {}
        if not send:
            return None
        results = {}
        for req_id, (outcome, extra) in send.items():
            stats = outcome.job.result.as_dict() if isinstance(outcome, Finished) else outcome
            results[req_id] = {**stats, **extra}
        return KVFlowWorkerMetadata(results)


def _timed_on_gpu_async(outcome: Finished | dict) -> bool:
    """An asynchronous load whose phases are timed by CUDA events."""
    job = outcome.job if isinstance(outcome, Finished) else None
    timer = job.result.timer if job is not None else None
    return timer is not None and timer.on_cuda and not job.plan.sync


def device_type(vllm_config) -> str:
    """The engine's device type ("cpu", "cuda", ...); "cpu" where the config has none."""
    return str(getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu"))


def separate_blend_stream(config: KVFlowConfig, vllm_config) -> bool:
    """Whether blend work runs on a stream of its own (blend_stream "side", or
    "background": the same, with vLLM's stream lifted above it by
    patches/forward_priority.py): on GPU
    engines of one rank. Several ranks run collectives in their passes, which must
    come in one order on every rank beside those of the forward."""
    return (config.blend_stream in ("side", "background") and device_type(vllm_config) == "cuda"
            and vllm_config.parallel_config.tensor_parallel_size == 1)


def timed_steps(config: KVFlowConfig, vllm_config) -> bool:
    """Whether a step's blend work is bounded in time too (max_blend_ms_per_step): on
    CPU engines of one rank. Every tensor-parallel rank must run the same rows (their
    passes run collectives), and each would measure its own cost per row; on GPU the
    passes are queued asynchronously, and timing them would make the host wait."""
    return (config.max_blend_ms_per_step is not None and device_type(vllm_config) == "cpu"
            and vllm_config.parallel_config.tensor_parallel_size == 1)


def step_budget(config: KVFlowConfig, vllm_config) -> StepBudget:
    """The blend work one engine step may carry: the settings, by default a share of
    the step's own token budget (vLLM's max_num_batched_tokens) for each kind; and on CPU
    engines max_blend_ms_per_step (timed_steps). Ahead of the forward on vLLM's stream,
    an eighth, so that a step with blend work takes at most about a quarter longer than
    vLLM's own largest. Beside it on a stream of its own, 3/16: there it no longer holds
    the forward up, and on an H200 (Llama-8B shape, C = 32, README "Under load") 1024
    rows gave infoflow 2.86x full's throughput, 1536 3.06x and 2048 3.08x, while a small
    request during a burst waited about as long with each (3.1-3.4x its time alone,
    measured before a blocking copy in each new load was removed)."""
    step_tokens = int(getattr(vllm_config.scheduler_config, "max_num_batched_tokens", 0) or 2048)
    share = 3 / 16 if separate_blend_stream(config, vllm_config) else 1 / 8
    default = max(128, int(step_tokens * share))
    timed = timed_steps(config, vllm_config)
    return StepBudget(blend_rows=config.max_blend_tokens_per_step or default,
                      isolated_rows=config.max_isolated_tokens_per_step or default,
                      max_isolated_per_prompt_token=config.max_isolated_tokens_per_prompt_token,
                      yield_steps=config.max_yield_steps,
                      step_seconds=config.max_blend_ms_per_step / 1e3 if timed else None)


def store_identity(vllm_config) -> str:
    """What chunk KV on disk must match to be used here: the model (its path or name,
    revision and, for a local directory, its weight files' sizes and mtimes, so rebuilt
    weights at the same path do not match), dtype, this worker's KV layout and rank."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    weights = hashlib.sha256()
    if os.path.isdir(mc.model):
        for name in sorted(os.listdir(mc.model)):
            if name.endswith((".safetensors", ".bin", ".pt", ".json")):
                st = os.stat(os.path.join(mc.model, name))
                weights.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        rank = f"tp{get_tensor_model_parallel_rank()}/{pc.tensor_parallel_size}" \
               f"-pp{get_pp_group().rank_in_group}/{pc.pipeline_parallel_size}"
    except Exception:  # noqa: BLE001 - groups not initialized (single process)
        rank = "tp0/1-pp0/1"
    return (f"model={mc.model}@{mc.revision or ''}#{weights.hexdigest()[:16]}|dtype={mc.dtype}"
            f"|layers={mc.get_num_layers(pc)}|kv_heads={mc.get_num_kv_heads(pc)}"
            f"|head_size={mc.get_head_size()}|{rank}")


@contextlib.contextmanager
def _sync_checked():
    """KVFLOW_SYNC_CHECK=1 (CUDA): PyTorch warns at each call in the step's blend work
    that makes the host wait for the GPU (a blocking copy, .item(), a sync), once per
    call site, into the server log. The blend work queues GPU work and never waits for
    it: such a wait holds up the step's forward for everything queued before it (one
    such copy cost ~30 ms per step on an H200; suite.sh syncprobe counts them)."""
    if os.environ.get("KVFLOW_SYNC_CHECK") != "1" or not torch.cuda.is_available():
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def _maybe_profiled(name: str):
    """KVFLOW_PROFILE_DIR=dir: profile each step's blend work and write its top entries
    to dir/<name>.txt. For finding where a load's time goes on a new card or backend;
    off by default. KVFLOW_PROFILE_MODE "torch" (default): torch.profiler's operators
    by host and device time (the step then waits for its GPU work, so that the device
    times are complete); "python": cProfile's functions by cumulative host time, with
    nothing waited for, i.e. the host time that delays the step's forward (also saved
    as dir/<name>.prof, which benchmarks/gpu/rank_step_profiles.py sums over the slow
    steps)."""
    out_dir = os.environ.get("KVFLOW_PROFILE_DIR")
    if not out_dir:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80]
    path = os.path.join(out_dir, f"{safe}.txt")
    if os.environ.get("KVFLOW_PROFILE_MODE", "torch") == "python":
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(path[:-len(".txt")] + ".prof")  # for pstats across steps
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
            with open(path, "w") as f:
                f.write(text.getvalue())
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a load does not wait for its GPU work: the profile must
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=40))
        if torch.cuda.is_available():
            f.write("\n")
            f.write(table.table(sort_by="self_cuda_time_total", row_limit=25))

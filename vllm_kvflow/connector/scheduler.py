"""Scheduler side: parse each request's chunk declaration, report the reusable context
as externally computed tokens loaded asynchronously, learn the request's blocks, and
hand the worker a plan.

The load is asynchronous in vLLM's sense: the request waits (WAITING_FOR_REMOTE_KVS)
while vLLM goes on scheduling other requests, until the worker reports its load done
(get_finished). At most `max_pending_loads` loads are in flight; a further request is
not admitted yet (it stays in vLLM's waiting queue and is asked about again next step).

Touches no tensors. Per-request stats collect here and go back to the client through
`request_finished` (vLLM puts the returned dict in the output's kv_transfer_params).
"""
from __future__ import annotations

import logging
from typing import Any

from vllm_kvflow.blend.pipeline import LoadPlan
from vllm_kvflow.blend.selection import method
from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.connector.counters import ServingCounters
from vllm_kvflow.connector.metadata import KVFlowConnectorMetadata, KVFlowWorkerMetadata
from vllm_kvflow.patches.prefix_cache import blend_salt, isolate_blended_blocks, tenant_salt
from vllm_kvflow.patches.scheduler_output import step_view
from vllm_kvflow.request import PARAMS_KEY, STATS_KEY, RequestError, RequestSpec, parse_request
from vllm_kvflow.store.entry import tenant_namespace

logger = logging.getLogger("vllm_kvflow")

# Chunk texts whose token ids the scheduler side keeps (a few KB each).
TOKEN_CACHE_ENTRIES = 4096


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class KVFlowScheduler:
    def __init__(self, config: KVFlowConfig, tokenizer_path: str | None, store_tier: str = "host",
                 sync_loads: bool = True):
        self.config = config
        # Whether a lone request loads synchronously. Not where steps are bounded in time
        # (CPU engines): there its misses are computed in bounded steps like anyone's,
        # since a burst's first request is lone only until the next one arrives.
        self._sync_loads = sync_loads
        self.counters = ServingCounters(store_tier)
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._load_tokenizer_at_start()
        self._specs: dict[str, RequestSpec] = {}
        self._pending: dict[str, LoadPlan] = {}
        self._stats: dict[str, dict[str, Any]] = {}
        self._in_flight: set[str] = set()  # loads planned, no result from the worker yet
        self._sync: dict[str, bool] = {}  # per request being admitted: a synchronous load
        # Requests vLLM has scheduled and not yet finished (running or preempted): with
        # none, the engine is idle (it runs no steps then, so an empty step would never
        # tell).
        self._live: set[str] = set()
        self._awaiting_result: set[str] = set()  # loads sent to the worker, no result yet
        self._finished: set[str] = set()  # finished while awaiting their load result
        self._token_cache: dict[str, tuple[int, ...]] = {}  # chunk text -> ids, LRU order

    def _load_tokenizer_at_start(self) -> None:
        """Load the tokenizer for chunk texts now, at engine start. Loaded at the first
        request declaring texts, it held up that step for everyone (Llama-3.1's takes
        0.5-0.9 s to load on a small CPU): the likely cause of the two 0.4-0.7 s steps
        that opened the first burst after start on an H200 (README, "Under load"). A
        failure here is logged; the first request that needs the tokenizer tries again
        and reports its own error."""
        if self._tokenizer_path is None:
            return
        try:
            self._tokenizer = _load_tokenizer(self._tokenizer_path)
            self._tokenizer.encode("warm up", add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - never fail the engine's start
            self._tokenizer = None
            logger.warning("kvflow: could not load the tokenizer %s at start (%s); the first "
                           "request declaring chunk texts will try again", self._tokenizer_path, e)

    def _tokenize(self, text: str) -> list[int]:
        """Token ids of a declared chunk text. Cached (LRU by count): RAG requests repeat
        the same documents, and tokenizing them again per request is host work in the
        engine's scheduling loop, paid by every request in the step."""
        ids = self._token_cache.pop(text, None)
        if ids is None:
            ids = tuple(self._loaded_tokenizer().encode(text, add_special_tokens=False))
        self._remember(text, ids)
        return list(ids)

    def _tokenize_together(self, texts: list[str]) -> None:
        """Tokenize the texts the cache lacks in one batched call before parsing looks
        them up one by one: a fast tokenizer spreads a batch over the host's threads,
        where one text after another runs on one. A request of 8 fresh ~400-token
        documents took the scheduling loop 9.7 ms one by one and 5.6 ms batched on 2
        cores (Llama-3.1's tokenizer; more cores spread it further)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
        if len(missing) < 2:
            return  # nothing to spread
        try:
            batch = self._loaded_tokenizer()(missing, add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - parsing tokenizes them one by one and reports
            return
        for text, ids in zip(missing, batch):
            self._remember(text, tuple(ids))

    def _loaded_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self._tokenizer_path)
        return self._tokenizer

    def _remember(self, text: str, ids: tuple[int, ...]) -> None:
        if text not in self._token_cache and len(self._token_cache) >= TOKEN_CACHE_ENTRIES:
            del self._token_cache[next(iter(self._token_cache))]  # the least recently used
        self._token_cache[text] = ids

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        req_id = request.request_id
        if params is None:
            return 0, False
        if req_id in self._specs:  # asked again (its blocks did not fit last time)
            return self._matched(req_id, self._specs[req_id], num_computed_tokens)
        if len(self._in_flight) >= self.config.max_pending_loads:
            return None, False  # the worker's queue is full: ask again next step
        stats = self._stats.setdefault(req_id, {})
        try:
            spec = parse_request(params, request.prompt_token_ids, self.config, self._tokenize,
                                 tokenize_ahead=self._tokenize_together)
        except RequestError as e:
            stats.update(fallback="bad-request", error=str(e))
            logger.warning("kvflow: request %s falls back to full prefill: %s", req_id, e)
            return 0, False
        stats.update(method=spec.method, ratio=spec.ratio, chunks=len(spec.chunks),
                     chunks_unlocatable=spec.unlocatable, chunks_too_short=spec.too_short,
                     chunk_tokens=spec.num_chunk_tokens,
                     context_tokens=spec.context_end)
        if spec.unlocatable:
            logger.warning("kvflow: request %s: chunks %s not found in the prompt",
                           req_id, spec.unlocatable)
        if not method(spec.method).reuses:  # plain prefill, asked for
            stats["fallback"] = None
            return 0, False
        if num_computed_tokens >= spec.context_end:
            stats["prefix_cache_tokens"] = num_computed_tokens
            return 0, False
        self._specs[req_id] = spec
        # Blended KV is approximate: keep it out of the exact prefix cache.
        isolate_blended_blocks(request, blend_salt(request.prompt_token_ids, spec, tenant_salt(request)))
        return self._matched(req_id, spec, num_computed_tokens)

    def _matched(self, req_id: str, spec: RequestSpec, num_computed_tokens: int) -> tuple[int, bool]:
        """The context is reported as computed externally. Asynchronously (True): vLLM
        schedules other requests until the worker is done. Synchronously where nothing
        would wait for it (no other request live in the engine, no other load in flight):
        the load then runs within this step, before the forward that prefills the rest,
        which saves a lone request the extra engine steps of an asynchronous load."""
        sync = self._sync_loads and not self._in_flight and not (self._live - {req_id})
        self._sync[req_id] = sync
        return spec.context_end - num_computed_tokens, not sync

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        # Every request vLLM admits passes here: one admitted earlier in this very
        # scheduling pass is live for the requests asked about after it.
        self._live.add(request.request_id)
        spec = self._specs.pop(request.request_id, None)
        if spec is None:
            return
        if num_external_tokens == 0:
            self._stats[request.request_id]["fallback"] = "scheduler-declined-load"
            return
        block_ids = list(blocks.get_block_ids()[0])
        sync = self._sync.pop(request.request_id, False)
        self._in_flight.add(request.request_id)
        self._pending[request.request_id] = LoadPlan(
            req_id=request.request_id,
            token_ids=list(request.prompt_token_ids),
            chunks=spec.chunks,
            question=spec.question,
            method=spec.method,
            ratio=spec.ratio,
            namespace=self._namespace(request, spec),
            load_start=spec.context_end - num_external_tokens,
            block_ids=block_ids,
            sync=sync,
        )

    @staticmethod
    def _namespace(request, spec: RequestSpec) -> str:
        # Tenants that salt their prefix cache are isolated in the chunk store (and the
        # glue cache) too; the two fields are encoded apart, so that no namespace or
        # salt can spell another tenant's pair.
        return tenant_namespace(spec.namespace, tenant_salt(request))

    def build_connector_meta(self, scheduler_output) -> KVFlowConnectorMetadata:
        step = step_view(scheduler_output)
        meta = KVFlowConnectorMetadata(loads=list(self._pending.values()), scheduled_tokens=step.total_tokens,
                                       starting=step.starting)
        self._live |= step.scheduled
        self._live -= step.finished
        self._awaiting_result.update(self._pending)
        self._pending.clear()
        return meta

    def update_connector_output(self, connector_output) -> None:
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(worker_meta, KVFlowWorkerMetadata):
            return
        for req_id, result in worker_meta.results.items():
            self._awaiting_result.discard(req_id)
            self._in_flight.discard(req_id)
            stats = self._stats.get(req_id)
            if stats is None:
                continue
            stats.update(result)
            stats.setdefault("fallback", None)
            if isinstance(result.get("store"), dict):
                self.counters.observe_store(result["store"])
            if "error" in result:
                stats["fallback"] = result.get("fallback") or "worker-error"
            if req_id in self._finished:
                self._finished.discard(req_id)
                self._done(req_id)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._specs.pop(req_id, None)
        self._sync.pop(req_id, None)
        self._live.discard(req_id)
        # A plan not sent yet still goes to the worker: vLLM keeps an aborted request's
        # blocks until the worker reports its load, so the worker must hear of it.
        self._in_flight.discard(req_id)
        stats = self._stats.get(req_id)
        if stats is None:
            return False, None
        if req_id in self._awaiting_result:
            # A request that stops on its first step finishes in the same engine update
            # that carries its load result, but before the result is read. Return the
            # live dict: the result is merged into it later in that update, before the
            # outputs leave the engine core.
            self._finished.add(req_id)
        else:
            self._done(req_id)
        return False, {STATS_KEY: stats}

    def _done(self, req_id: str) -> None:
        stats = self._stats.pop(req_id)
        self.counters.observe_request(stats)
        if self.config.log_stats:
            logger.info("kvflow: request %s %s", req_id, stats)

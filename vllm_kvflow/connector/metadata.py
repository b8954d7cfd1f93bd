"""What crosses the scheduler/worker process boundary, as typed dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_kvflow.blend.pipeline import LoadPlan


@dataclass
class KVFlowConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the loads to perform before the forward."""

    loads: list[LoadPlan] = field(default_factory=list)
    # Tokens of this step's forward (all requests in it; a request whose load is
    # asynchronous is not among them, it waits): with none, and one load queued, the
    # worker need not bound that load's work to keep others going.
    scheduled_tokens: int = 0
    # Requests in their first forward this step: the worker gives such a step no blend
    # work (every other step at most), so their first token is not late.
    starting: int = 0


@dataclass
class KVFlowWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: per-request results of this step's loads."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: "KVFlowWorkerMetadata") -> "KVFlowWorkerMetadata":
        # Tensor-parallel ranks do the same selection on their own heads; an error on
        # any rank wins so the scheduler sees it.
        merged = dict(self.results)
        for req_id, res in other.results.items():
            if req_id not in merged or "error" in res:
                merged[req_id] = res
        return KVFlowWorkerMetadata(merged)

"""kvflow counters on vLLM's /metrics, through vLLM's own connector-stats path.

The scheduler-side connector returns a `KVFlowConnectorStats` from
`get_kv_connector_stats()` each engine step; vLLM puts its `data` dict into the
scheduler stats that go to the API-server process, where `PrometheusStatLogger` calls
`KVFlowPromMetrics.observe()` (built by the connector's `build_prom_metrics`), and the
logging stat logger rebuilds the stats with `build_kv_connector_stats` to log them.
The payload's shape is `vllm_kvflow.connector.counters.ServingCounters.drain()`.

Exported (labels model_name, engine, plus the one named):
  vllm:kvflow_requests_total, vllm:kvflow_chunk_hits_total, vllm:kvflow_chunk_misses_total,
  vllm:kvflow_chunks_unlocatable_total, vllm:kvflow_tokens_reused_total,
  vllm:kvflow_tokens_recomputed_total, vllm:kvflow_kernel_fallbacks_total,
  vllm:kvflow_fallbacks_total{reason},
  vllm:kvflow_store_evictions_total{tier}, vllm:kvflow_store_bytes{tier},
  vllm:kvflow_store_entries{tier}, vllm:kvflow_store_remote_errors_total{kind}.

A vLLM without these classes (older releases) gets None from every hook: no metrics,
nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_kvflow.connector.counters import COUNTERS, merge
from vllm_kvflow.store.remote import ERROR_KINDS

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except ImportError:  # a vLLM without connector metrics
    KVConnectorPromMetrics = KVConnectorStats = None

PREFIX = "vllm:kvflow_"
_HELP = {
    "requests": "Requests that declared kvflow chunks.",
    "chunk_hits": "Chunks whose KV came from the chunk store.",
    "chunk_misses": "Chunks computed in isolation and stored (store misses).",
    "chunks_unlocatable": "Declared chunks not found in the prompt (prefilled normally).",
    "tokens_reused": "Chunk tokens whose KV came from the store.",
    "tokens_recomputed": "Chunk tokens recomputed over the blended cache.",
    "kernel_fallbacks": "Chunk loads the fused kernel refused, written by the slower gather.",
}


def make_stats(data: dict[str, Any] | None):
    if KVConnectorStats is None or not data:
        return None
    return KVFlowConnectorStats(data=data)


if KVConnectorStats is not None:

    @dataclass
    class KVFlowConnectorStats(KVConnectorStats):
        def reset(self):
            self.data = {}

        def aggregate(self, other):
            return KVFlowConnectorStats(data=merge(self.data, other.data))

        def reduce(self) -> dict[str, int | float]:
            out = {f"kvflow_{k}": v for k, v in self.data.get("counts", {}).items()}
            out.update({f"kvflow_fallback_{r}": n for r, n in self.data.get("fallbacks", {}).items()})
            out.update({f"kvflow_store_bytes_{t}": s["bytes"] for t, s in self.data.get("store", {}).items()})
            out.update({f"kvflow_store_remote_errors_{k}": n
                        for k, n in self.data.get("remote_errors", {}).items()})
            return out

        def is_empty(self) -> bool:
            d = self.data
            return not (any(d.get("counts", {}).values()) or d.get("store") or d.get("evictions")
                        or d.get("remote_errors"))


if KVConnectorPromMetrics is not None:

    class KVFlowPromMetrics(KVConnectorPromMetrics):
        def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            names = list(labelnames)
            self._counters = {k: self._counter_cls(name=PREFIX + k, documentation=_HELP[k],
                                                   labelnames=names) for k in COUNTERS}
            self._fallbacks = self._counter_cls(
                name=PREFIX + "fallbacks", labelnames=names + ["reason"],
                documentation="Requests prefilled in full instead of blended, by reason.")
            self._evictions = self._counter_cls(
                name=PREFIX + "store_evictions", labelnames=names + ["tier"],
                documentation="Chunk store evictions, by tier.")
            self._bytes = self._gauge_cls(
                name=PREFIX + "store_bytes", labelnames=names + ["tier"],
                documentation="Bytes held by the chunk store, by tier.", multiprocess_mode="mostrecent")
            self._entries = self._gauge_cls(
                name=PREFIX + "store_entries", labelnames=names + ["tier"],
                documentation="Chunks held by the chunk store, by tier.", multiprocess_mode="mostrecent")
            self._remote_errors = self._counter_cls(
                name=PREFIX + "store_remote_errors", labelnames=names + ["kind"],
                documentation="Remote chunk tier faults (each a local miss), by kind.")
            # Counters show 0 before their first event, so a scrape can diff against them.
            remote = _remote_configured(vllm_config)
            for labels in per_engine_labelvalues.values():
                for counter in self._counters.values():
                    counter.labels(*labels)
                for kind in ERROR_KINDS if remote else ():
                    self._remote_errors.labels(*labels, kind)

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
            labels = self.per_engine_labelvalues[engine_idx]
            for name, n in transfer_stats_data.get("counts", {}).items():
                if name in self._counters and n:
                    self._counters[name].labels(*labels).inc(n)
            for reason, n in transfer_stats_data.get("fallbacks", {}).items():
                self._fallbacks.labels(*labels, reason).inc(n)
            for tier, n in transfer_stats_data.get("evictions", {}).items():
                self._evictions.labels(*labels, tier).inc(n)
            for kind, n in transfer_stats_data.get("remote_errors", {}).items():
                self._remote_errors.labels(*labels, kind).inc(n)
            for tier, snap in transfer_stats_data.get("store", {}).items():
                self._bytes.labels(*labels, tier).set(snap["bytes"])
                self._entries.labels(*labels, tier).set(snap["entries"])


def _remote_configured(vllm_config) -> bool:
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(transfer, "kv_connector_extra_config", None) or {}
    return bool(extra.get("store_remote_url"))


def make_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues):
    if KVConnectorPromMetrics is None:
        return None
    return KVFlowPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

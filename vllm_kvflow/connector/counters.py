"""Serving counters, folded from each finished request's kvflow_stats on the scheduler
side: the stats already hold the worker's results (chunk hits, tokens, a snapshot of
its store), so no extra traffic from the workers is needed.

`drain()` returns what happened since the last call, the payload vLLM carries from the
engine core to the API server, where `patches/connector_metrics.py` exports it.
"""
from __future__ import annotations

from typing import Any

# Per-request stats field -> counter name.
_REQUEST_FIELDS = {
    "chunks_hit": "chunk_hits",
    "chunks_missed": "chunk_misses",
    "tokens_reused": "tokens_reused",
    "tokens_recomputed": "tokens_recomputed",
    "kernel_fallbacks": "kernel_fallbacks",
}
COUNTERS = ("requests", "chunk_hits", "chunk_misses", "chunks_unlocatable",
            "tokens_reused", "tokens_recomputed", "kernel_fallbacks")


def store_tiers(store: dict[str, Any], default_tier: str) -> dict[str, dict[str, int]]:
    """{tier: {"bytes", "entries", "evictions"}} from a worker's store snapshot: a
    tiered store reports `{"tiers": {name: {...}}}`, a single-tier one flat fields.
    The remote tier is left out: its size is the server's, not known here."""
    tiers = store.get("tiers")
    if not isinstance(tiers, dict):
        tiers = {default_tier: store}
    return {name: {k: int(t.get(k, 0) or 0) for k in ("bytes", "entries", "evictions")}
            for name, t in tiers.items() if isinstance(t, dict) and name != "remote"}


def remote_errors(store: dict[str, Any]) -> dict[str, int]:
    """{kind: count since the worker started} of the remote tier's faults, or {}."""
    remote = (store.get("tiers") or {}).get("remote")
    errors = remote.get("errors") if isinstance(remote, dict) else None
    return {k: int(n or 0) for k, n in errors.items()} if isinstance(errors, dict) else {}


class ServingCounters:
    def __init__(self, default_tier: str):
        self.default_tier = default_tier
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._fallbacks: dict[str, int] = {}
        self._store: dict[str, dict[str, int]] = {}  # latest snapshot per tier
        self._evictions: dict[str, int] = {}  # since the last drain, per tier
        self._seen_evictions: dict[str, int] = {}  # the store's cumulative count
        self._remote_errors: dict[str, int] = {}  # since the last drain, per kind
        self._seen_remote_errors: dict[str, int] = {}

    def observe_request(self, stats: dict[str, Any]) -> None:
        self._counts["requests"] += 1
        for field, name in _REQUEST_FIELDS.items():
            self._counts[name] += int(stats.get(field) or 0)
        self._counts["chunks_unlocatable"] += len(stats.get("chunks_unlocatable") or ())
        reason = stats.get("fallback")
        if reason:
            self._fallbacks[reason] = self._fallbacks.get(reason, 0) + 1

    def observe_store(self, store: dict[str, Any]) -> None:
        for tier, snap in store_tiers(store, self.default_tier).items():
            # The store counts evictions since it started; export the increase.
            seen = self._seen_evictions.get(tier, 0)
            if snap["evictions"] > seen:
                self._evictions[tier] = self._evictions.get(tier, 0) + snap["evictions"] - seen
            self._seen_evictions[tier] = snap["evictions"]
            self._store[tier] = {"bytes": snap["bytes"], "entries": snap["entries"]}
        for kind, n in remote_errors(store).items():
            seen = self._seen_remote_errors.get(kind, 0)
            if n > seen:
                self._remote_errors[kind] = self._remote_errors.get(kind, 0) + n - seen
            self._seen_remote_errors[kind] = n

    def drain(self) -> dict[str, Any] | None:
        """Everything since the last drain (store: latest snapshot), or None if nothing."""
        if not any(self._counts.values()) and not self._store and not self._evictions \
                and not self._remote_errors:
            return None
        out = {"counts": self._counts, "fallbacks": self._fallbacks,
               "store": self._store, "evictions": self._evictions,
               "remote_errors": self._remote_errors}
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._fallbacks, self._store, self._evictions = {}, {}, {}
        self._remote_errors = {}
        return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two drained payloads as one: counts add up, the later store snapshot wins."""
    def add(x: dict, y: dict) -> dict:
        return {k: x.get(k, 0) + y.get(k, 0) for k in x.keys() | y.keys()}

    return {"counts": add(a.get("counts", {}), b.get("counts", {})),
            "fallbacks": add(a.get("fallbacks", {}), b.get("fallbacks", {})),
            "store": {**a.get("store", {}), **b.get("store", {})},
            "evictions": add(a.get("evictions", {}), b.get("evictions", {})),
            "remote_errors": add(a.get("remote_errors", {}), b.get("remote_errors", {}))}

"""Serving counters: per-request stats fold into counters, evictions export as
increases of the store's cumulative count, drains reset, payloads merge."""
from vllm_kvflow.connector.counters import ServingCounters, merge, store_tiers


def test_requests_fold_into_counts_and_fallbacks():
    c = ServingCounters("host")
    c.observe_request({"chunks_hit": 2, "chunks_missed": 1, "chunks_unlocatable": [3],
                       "tokens_reused": 50, "tokens_recomputed": 7, "kernel_fallbacks": 1,
                       "fallback": None})
    c.observe_request({"fallback": "bad-request", "error": "span"})
    out = c.drain()
    assert out["counts"] == {"requests": 2, "chunk_hits": 2, "chunk_misses": 1, "chunks_unlocatable": 1,
                             "tokens_reused": 50, "tokens_recomputed": 7, "kernel_fallbacks": 1}
    assert out["fallbacks"] == {"bad-request": 1}
    assert c.drain() is None  # reset


def test_store_snapshots_and_eviction_increases_per_tier():
    c = ServingCounters("host")
    c.observe_store({"bytes": 10, "entries": 1, "evictions": 2})
    c.observe_store({"bytes": 30, "entries": 3, "evictions": 5})
    out = c.drain()
    assert out["store"] == {"host": {"bytes": 30, "entries": 3}} and out["evictions"] == {"host": 5}
    c.observe_store({"bytes": 30, "entries": 3, "evictions": 5})
    assert c.drain()["evictions"] == {}  # no new evictions
    tiered = {"bytes": 9, "tiers": {"device": {"bytes": 4, "entries": 1, "evictions": 1},
                                    "disk": {"bytes": 5, "entries": 2}}}
    assert store_tiers(tiered, "host") == {"device": {"bytes": 4, "entries": 1, "evictions": 1},
                                           "disk": {"bytes": 5, "entries": 2, "evictions": 0}}


def test_merge_adds_counts_and_keeps_the_later_snapshot():
    a = {"counts": {"requests": 1}, "fallbacks": {"x": 1}, "store": {"host": {"bytes": 1, "entries": 1}},
         "evictions": {"host": 1}}
    b = {"counts": {"requests": 2}, "fallbacks": {"x": 1, "y": 1},
         "store": {"host": {"bytes": 5, "entries": 2}}, "evictions": {}}
    m = merge(a, b)
    assert m["counts"] == {"requests": 3} and m["fallbacks"] == {"x": 2, "y": 1}
    assert m["store"] == {"host": {"bytes": 5, "entries": 2}} and m["evictions"] == {"host": 1}


def test_remote_errors_export_as_increases_and_the_remote_has_no_size_gauge():
    c = ServingCounters("host")
    snap = {"tiers": {"host": {"bytes": 4, "entries": 1, "evictions": 0},
                      "remote": {"hits": 3, "errors": {"connection": 2, "timeout": 0}}}}
    c.observe_store(snap)
    out = c.drain()
    assert out["remote_errors"] == {"connection": 2} and set(out["store"]) == {"host"}
    snap["tiers"]["remote"]["errors"] = {"connection": 2, "timeout": 1}
    c.observe_store(snap)
    assert c.drain()["remote_errors"] == {"timeout": 1}
    c.observe_store(snap)
    assert c.drain()["remote_errors"] == {}
    m = merge({"remote_errors": {"oom": 1}}, {"remote_errors": {"oom": 2, "corrupt": 1}})
    assert m["remote_errors"] == {"oom": 3, "corrupt": 1}

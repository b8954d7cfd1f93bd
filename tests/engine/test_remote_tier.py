"""Two vLLM CPU servers (one core each where there are two) share one redis-server as
the remote chunk tier: a document warmed through A is a hit on B with no isolated
compute on B, tenants stay apart across servers, a corrupted value is skipped and
counted (kvflow_stats and /metrics), and killing the server changes no answer; a
restarted server is used again without restarting vLLM."""
from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import vllm_kvflow
from vllm_kvflow.client import KVFlowClient
from vllm_kvflow.server import ServerProcess, cpu_server_args

pytestmark = pytest.mark.engine

DOCS = ["Zorbia\nThe capital of Zorbia is Quellport, a harbor city on the eastern coast.",
        "Mirevale\nThe mayor of Mirevale is Ada Finch, elected in the spring of 1902.",
        "Tolm\nTolm exports copper and salt through the port of Quellport."]
QUESTIONS = ["What is the capital of Zorbia?", "What does Tolm export?"]


def _docs(tag: str) -> list[str]:
    # Fresh documents per test: stores and the redis server are shared by the module.
    return [f"{d} Record {tag}." for d in DOCS]


@pytest.fixture(scope="module")
def redis_srv(redis_binary, tmp_path_factory):
    from vllm_kvflow.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis"), binary=redis_binary) as srv:
        yield srv


@pytest.fixture(scope="module")
def redis_client(redis_srv):
    import redis

    client = redis.Redis.from_url(redis_srv.url)
    yield client
    client.close()


def _pinned(server: ServerProcess, core: int) -> ServerProcess:
    """The server on one core (taskset), as one replica per core."""
    if shutil.which("taskset"):
        server.argv = ["taskset", "-c", str(core), *server.argv]
    return server


@pytest.fixture(scope="module")
def servers(model_path, redis_srv, tmp_path_factory):
    """Servers A and B on the first and last core this process may use, started at once."""
    logs = tmp_path_factory.mktemp("servers")
    config = vllm_kvflow.transfer_config(store_remote_url=redis_srv.url, store_remote_timeout_s=0.5)
    cores = sorted(os.sched_getaffinity(0))
    # A start takes ~40 s on an idle core; a shared, busy machine can take many times that.
    procs = [_pinned(ServerProcess(model_path, logs / f"{name}.log", config,
                                   cpu_server_args(model_path, 1024, 4), startup_timeout_s=900), core)
             for name, core in (("a", cores[0]), ("b", cores[-1]))]
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda p: p.__enter__(), procs))
    try:
        yield [KVFlowClient(p.base_url) for p in started]
    finally:
        for p in started:
            p.__exit__(None, None, None)


def _kvflow_keys(redis_client) -> set[bytes]:
    return set(redis_client.scan_iter(match="kvflow:*", count=1000))


def _warm_and_wait(client: KVFlowClient, redis_client, docs, **kw) -> set[bytes]:
    """Warm docs through client; the remote keys its asynchronous writes add."""
    before = _kvflow_keys(redis_client)
    stats = client.warm(docs, **kw)
    assert sum(s["chunks_missed"] for s in stats) == len(docs)
    deadline = time.monotonic() + 30
    while len(new := _kvflow_keys(redis_client) - before) < len(docs):
        assert time.monotonic() < deadline, f"remote writes did not land: {len(new)} of {len(docs)}"
        time.sleep(0.1)
    return new


def _remote(stats: dict) -> dict:
    return stats["store"]["tiers"]["remote"]


def test_document_warmed_on_a_is_a_hit_on_b(servers, redis_client):
    a, b = servers
    docs = _docs("share")
    _warm_and_wait(a, redis_client, docs)
    on_b = b.query(QUESTIONS[0], docs, max_tokens=8)
    assert (on_b.stats["chunks_hit"], on_b.stats["chunks_missed"]) == (3, 0)  # no compute on B
    assert _remote(on_b.stats)["hits"] >= 3
    on_a = a.query(QUESTIONS[0], docs, max_tokens=8)  # A: from its own memory
    assert on_a.stats["chunks_hit"] == 3 and on_b.text == on_a.text


def test_tenants_stay_isolated_across_servers(servers, redis_client):
    a, b = servers
    docs = _docs("tenant")
    _warm_and_wait(a, redis_client, docs, cache_salt="tenant-a")
    other = b.query(QUESTIONS[1], docs, cache_salt="tenant-b", max_tokens=4).stats
    assert (other["chunks_hit"], other["chunks_missed"]) == (0, 3)
    same = b.query(QUESTIONS[1], docs, cache_salt="tenant-a", max_tokens=4).stats
    assert (same["chunks_hit"], same["chunks_missed"]) == (3, 0)


def _corrupt_count(client: KVFlowClient) -> float:
    for line in client.metrics_text().splitlines():
        if line.startswith("vllm:kvflow_store_remote_errors_total") and 'kind="corrupt"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_corrupted_value_is_skipped_and_counted(servers, redis_client):
    a, b = servers
    docs = _docs("corrupt")
    victim = sorted(_warm_and_wait(a, redis_client, docs))[0]
    data = bytearray(redis_client.get(victim))
    data[-20] ^= 0x01  # size and header intact: only the checksum can tell
    redis_client.set(victim, bytes(data))
    before = _corrupt_count(b)
    r = b.query(QUESTIONS[0], docs, max_tokens=8)
    assert (r.stats["chunks_hit"], r.stats["chunks_missed"]) == (2, 1)
    assert _remote(r.stats)["errors"]["corrupt"] >= 1
    assert r.text == a.query(QUESTIONS[0], docs, max_tokens=8).text
    deadline = time.monotonic() + 20  # /metrics follows the engine's stats asynchronously
    while _corrupt_count(b) < before + 1:
        assert time.monotonic() < deadline, "vllm:kvflow_store_remote_errors_total{kind=corrupt}"
        time.sleep(0.5)


def test_killing_redis_changes_no_answers_and_a_restart_is_picked_up(servers, redis_srv, redis_client):
    a, b = servers
    docs = _docs("kill")
    _warm_and_wait(a, redis_client, docs)
    before = [a.query(q, docs, max_tokens=8) for q in QUESTIONS]
    redis_srv.kill()
    after = [b.query(q, docs, max_tokens=8) for q in QUESTIONS]
    assert [r.text for r in after] == [r.text for r in before]
    assert (after[0].stats["chunks_hit"], after[0].stats["chunks_missed"]) == (0, 3)  # computed on B
    assert _remote(after[0].stats)["errors"]["connection"] >= 1

    redis_srv.start()  # same port, empty: B picks it up after its back-off
    deadline = time.monotonic() + 60
    for attempt in range(100):
        fresh = _docs(f"restart-{attempt}")
        b.warm(fresh)
        time.sleep(0.5)  # the asynchronous writes
        if a.query(QUESTIONS[0], fresh, max_tokens=2).stats["chunks_hit"] == 3:
            break
        assert time.monotonic() < deadline, "the restarted server was not used again"
    assert re.match(r"redis://127\.0\.0\.1:\d+/0", _remote(after[-1].stats)["url"])

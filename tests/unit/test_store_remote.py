"""Remote chunk tier against a real redis-server on loopback: bit-exact round trip and
promotion, keys scoped by identity and tenant, verification (token ids, checksum,
identity), and faults that never fail a lookup: server killed and restarted, stalled
(SIGSTOP), out of memory, write queue full."""
import hashlib
import logging
import subprocess
import sys
import time

import pytest
import torch

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.store import ChunkKV, ChunkStore, MemoryTier, chunk_key
from vllm_kvflow.store.build import build_store
from vllm_kvflow.store.disk import DiskTier
from vllm_kvflow.store.remote import RemoteTier, _Backoff, _RateLimitedLog

ID = "model=m|dtype=float32|layers=2|kv_heads=2|head_size=4|tp0/1"


def _entry(tokens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (2, len(tokens), 2, 4)
    return ChunkKV(tuple(tokens), torch.randn(shape, generator=g).to(dtype),
                   torch.randn(shape, generator=g).to(dtype), local_start=1)


def _same(a: ChunkKV, b: ChunkKV) -> bool:
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return (a.token_ids == b.token_ids and a.local_start == b.local_start
            and a.keys.dtype == b.keys.dtype and a.keys.shape == b.keys.shape
            and torch.equal(raw(a.keys), raw(b.keys)) and torch.equal(raw(a.values), raw(b.values)))


@pytest.fixture
def stores(redis_server):
    """Factory of stores (one per simulated replica) on one server; closed at the end."""
    made = []

    def make(identity=ID, memory=1 << 20, disk=None, **remote_kw):
        remote = RemoteTier(redis_server.url, identity, **remote_kw)
        store = ChunkStore(tiers=[MemoryTier("host", memory)], disk=disk, remote=remote)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def client(redis_server):
    import redis

    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def _written(store: ChunkStore, key: str, entry: ChunkKV) -> None:
    assert store.put(key, entry)
    store.flush()
    assert store.remote.counters.inserts >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_promoted(stores, client, dtype):
    a, b = stores(), stores()
    entry = _entry([5, 6, 7], seed=3, dtype=dtype)
    _written(a, "k", entry)
    prefix = hashlib.sha256(ID.encode()).hexdigest()[:16]
    assert client.exists(f"kvflow:{prefix}:k") == 1

    got = b.get("k", [5, 6, 7])  # b's memory is empty: from the server
    assert got is not None and _same(got, entry)
    assert b.tiers[0].keys_lru_order() == ["k"]  # promoted
    remote = b.stats()["tiers"]["remote"]
    assert remote["hits"] == 1 and remote["bytes_read"] > entry.nbytes and b.counters.hits == 1
    assert b.get("k", [5, 6, 7]) is not None and b.tiers[0].counters.hits == 1
    assert b.remote.counters.hits == 1  # the second hit was local


def test_remote_hit_is_promoted_to_the_disk_too(stores, tmp_path):
    a = stores()
    entry = _entry([1, 2], seed=1)
    _written(a, "k", entry)
    b = stores(disk=DiskTier(tmp_path / "kv", 1 << 20, ID))
    assert b.get("k", [1, 2]) is not None
    b.flush()
    assert b.disk.keys_lru_order() == ["k"] and _same(b.disk.get("k"), entry)


def test_store_without_memory_room_still_serves_through_the_remote(stores):
    store = stores(memory=0)
    entry = _entry([1, 2, 3])
    assert store.put("k", entry)  # no memory tier holds it, the remote does
    store.flush()
    assert store.get("k", [1, 2, 3]) is not None and store.remote.counters.hits == 1


def test_other_identity_and_other_tenant_miss(stores):
    a = stores()
    mine = chunk_key("m", "ns|salt=tenant-a", [1], [4, 5])
    _written(a, mine, _entry([4, 5]))
    other_model = stores(identity=ID.replace("layers=2", "layers=3"))
    assert other_model.get(mine, [4, 5]) is None and other_model.remote.counters.misses == 1
    b = stores()
    theirs = chunk_key("m", "ns|salt=tenant-b", [1], [4, 5])
    assert b.get(theirs, [4, 5]) is None and b.remote.counters.misses == 1
    assert b.get(mine, [4, 5]) is not None


def test_token_mismatch_is_a_collision_not_a_hit(stores):
    a, b = stores(), stores()
    _written(a, "k", _entry([1, 2]))
    assert b.get("k", [1, 3]) is None
    assert b.counters.hash_collisions == 1 and b.counters.misses == 1 and b.counters.hits == 0


def test_corrupt_values_are_skipped_counted_and_deleted(stores, client):
    a = stores()
    _written(a, "k", _entry([1, 2, 3]))
    rkey = a.remote.remote_key("k")
    good = client.get(rkey)
    flipped = bytearray(good)
    flipped[-20] ^= 0x01  # size and header intact: only the checksum catches it
    for n, bad in enumerate([bytes(flipped), good[:-10], b"not a chunk"], start=1):
        client.set(rkey, bad)
        b = stores()
        assert b.get("k", [1, 2, 3]) is None
        b.flush()
        assert b.remote.counters.errors["corrupt"] == 1 and b.counters.misses == 1
        assert client.exists(rkey) == 0  # deleted, so the next miss writes a good one
    c = stores()
    _written(c, "k", _entry([1, 2, 3]))
    assert stores().get("k", [1, 2, 3]) is not None


def test_foreign_value_is_skipped_and_left(stores, client):
    a = stores()
    _written(a, "k", _entry([1, 2]))
    other = stores(identity="another model")
    client.set(other.remote.remote_key("k"), client.get(a.remote.remote_key("k")))
    assert other.get("k", [1, 2]) is None
    other.flush()
    assert other.remote.counters.errors["foreign"] == 1
    assert client.exists(other.remote.remote_key("k")) == 1


def test_killed_server_is_a_miss_and_a_restart_is_picked_up(stores, redis_server):
    a, b = stores(), stores()
    _written(a, "k", _entry([1, 2]))
    _written(b, "kb", _entry([5]))  # b's writer is up and past its start-up check
    redis_server.kill()
    t0 = time.monotonic()
    assert b.get("k", [1, 2]) is None  # refused: fast
    assert b.get("k", [1, 2]) is None  # backing off: not even tried
    assert time.monotonic() - t0 < 0.5
    remote = b.stats()["tiers"]["remote"]
    assert remote["errors"]["connection"] == 1 and remote["lookups_skipped"] == 1
    assert not remote["available"]
    assert b.put("fresh", _entry([7])) and b.get("fresh", [7]) is not None  # local tiers go on

    redis_server.start()  # same port, empty
    t0 = time.monotonic()
    while time.monotonic() - t0 < _Backoff.LONGEST_S + 5:
        if b.remote.stats()["available"] and b.put("after", _entry([8, 9])):
            b.flush()
            if stores().get("after", [8, 9]) is not None:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"no reconnection; {b.remote.stats()}")
    assert b.remote.counters.inserts >= 1


def test_stalled_server_times_out_within_the_bound(stores, redis_server):
    a = stores(timeout_s=0.3)
    _written(a, "k", _entry([1, 2]))  # also waits out the writer's start-up check
    redis_server.pause()
    try:
        t0 = time.monotonic()
        assert a.get("other", [3]) is None
        took = time.monotonic() - t0
        assert 0.25 < took < 1.5, took
        t0 = time.monotonic()
        assert a.get("other", [3]) is None and time.monotonic() - t0 < 0.05  # backing off
        assert a.remote.counters.errors["timeout"] == 1
    finally:
        redis_server.resume()
    a.clear()
    time.sleep(_Backoff.FIRST_S + 0.1)
    assert a.get("k", [1, 2]) is not None and a.remote.counters.hits == 1


def test_out_of_memory_write_is_counted_and_the_lookup_goes_on(stores, client):
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write is over: OOM
    try:
        a = stores()
        assert a.put("k", _entry([1, 2]))
        a.flush()
        assert a.remote.counters.errors["oom"] == 1 and a.remote.counters.inserts == 0
        assert a.remote.stats()["available"]  # OOM is not an outage: reads go on
        assert a.get("k", [1, 2]) is not None  # from memory
        assert client.exists(a.remote.remote_key("k")) == 0
    finally:
        client.config_set("maxmemory", "0")


def test_full_write_queue_drops_the_write(stores, redis_server):
    a = stores(timeout_s=0.5, queue_bytes=1)
    a.put("warm", _entry([0]))
    a.flush()  # the writer's start-up check is done
    redis_server.pause()  # the next write hangs until its timeout
    try:
        assert a.put("k1", _entry([1, 2]))
        assert a.put("k2", _entry([3, 4]))  # memory takes it; the full queue drops the write
        assert a.remote.counters.writes_dropped == 1
    finally:
        redis_server.resume()
    a.flush()


def test_faults_are_logged_once_per_kind_per_interval(caplog):
    log = _RateLimitedLog(every_s=0.2)
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        for _ in range(5):
            log.warn("timeout", "slow %s", "x")
        log.warn("oom", "full")
        time.sleep(0.25)
        log.warn("timeout", "slow %s", "y")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].endswith("slow x") and "full" in lines[1]
    assert "slow y (4 more timeout faults since the last such line)" in lines[2]


def test_build_store_and_settings(redis_server):
    cfg = KVFlowConfig(store_remote_url=redis_server.url, store_remote_gb=0.5,
                       store_remote_timeout_s=0.2, store_remote_queue_mb=1)
    store = build_store(cfg, "cpu", ID)
    try:
        assert store.remote.capacity_bytes == 1 << 29 and store.remote.timeout_s == 0.2
        assert store.remote.queue_bytes == 1 << 20
        assert set(store.stats()["tiers"]) == {"host", "remote"}
    finally:
        store.close()
    for bad in ({"store_remote_url": "http://h:1"}, {"store_remote_url": "redis://"},
                {"store_remote_timeout_s": 0}, {"store_remote_gb": -1},
                {"store_remote_queue_mb": "1"}):
        with pytest.raises(ValueError):
            KVFlowConfig.from_extra_config(bad)


def test_store_imports_and_builds_without_redis_unless_asked():
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from vllm_kvflow.config import KVFlowConfig\n"
        "from vllm_kvflow.store.build import build_store\n"
        "build_store(KVFlowConfig(), 'cpu', 'id').close()\n"
        "cfg = KVFlowConfig(store_remote_url='redis://127.0.0.1:1/0')\n"
        "try:\n"
        "    build_store(cfg, 'cpu', 'id')\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORT-ERROR kvflow: store_remote_url needs the redis package" in out.stdout


@pytest.fixture
def cluster(redis_binary, tmp_path):
    """Three masters, slots spread over them by the server's own CLI."""
    import shutil

    from vllm_kvflow.redis_server import RedisServer

    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if cli is None:
        pytest.skip("no redis-cli or valkey-cli to create a cluster")
    from vllm_kvflow.server import free_port

    # The bus port defaults to port + 10000, past 65535 for a high free port: name one.
    nodes = [RedisServer(tmp_path / f"node{i}", binary=redis_binary,
                         args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-port", str(free_port())])
             for i in range(3)]
    try:
        for node in nodes:
            node.start()
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        # Every node must see the whole cluster, not only the first (a client may be
        # sent to any of them).
        deadline = time.monotonic() + 60
        for node in nodes:
            while b"cluster_state:ok" not in subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"], capture_output=True).stdout:
                assert time.monotonic() < deadline, "cluster did not come up"
                time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def test_cluster_url_spreads_chunks_over_the_nodes(cluster):
    import redis

    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    a = ChunkStore(tiers=[MemoryTier("host", 1 << 20)], remote=RemoteTier(url, ID))
    b = ChunkStore(tiers=[MemoryTier("host", 1 << 20)], remote=RemoteTier(url, ID))
    try:
        entries = {f"k{i}": _entry([i, i + 1], seed=i) for i in range(12)}
        for key, entry in entries.items():
            assert a.put(key, entry)
        a.flush()
        assert all(_same(b.get(k, e.token_ids), e) for k, e in entries.items())
        sizes = [redis.Redis(port=n.port).dbsize() for n in cluster]
        assert sum(sizes) == 12 and sum(s > 0 for s in sizes) >= 2, sizes
        assert not any(b.remote.counters.errors.values())
    finally:
        a.close()
        b.close()


def test_a_chunk_stored_by_another_replica_after_a_miss_is_fetched(stores):
    """get_shared: a chunk that missed here and that another store wrote since comes from
    the remote tier (promoted), without counting the miss twice; without a remote, None."""
    a, b = stores(), stores()
    assert b.get("k", [1, 2]) is None and b.counters.misses == 1
    assert b.get_shared("k", [1, 2]) is None and b.counters.misses == 1  # not there yet
    assert b.remote.counters.misses == 1  # the remote tier's miss not counted twice either
    _written(a, "k", _entry([1, 2]))
    got = b.get_shared("k", [1, 2])
    assert got is not None and got.token_ids == (1, 2)
    assert b.counters.misses == 1 and b.remote.counters.hits == 1
    assert b.get("k", [1, 2]) is not None and b.tiers[0].counters.hits == 1  # promoted
    local = ChunkStore(tiers=[MemoryTier("host", 1 << 20)])
    assert local.get_shared("k", [1, 2]) is None

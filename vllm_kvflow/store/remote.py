"""Remote tier of the chunk store: a Redis/Valkey server (or cluster) shared by every
replica, below the local tiers, so a chunk computed by one replica is a hit on all.

- Key `kvflow:<sha256(identity)[:16]>:<chunk key>`: the chunk key already hashes model,
  namespace (with the tenant's salt), sink and token ids; the identity prefix keeps other
  models, dtypes, KV layouts and ranks apart. Value: the self-checking blob of
  chunk_format.py (the disk tier's bytes), verified on every read.
- Writes are asynchronous: a queue bounded in bytes (full: the write is dropped and
  counted) feeds a background thread. Reads run on the request thread with bounded
  socket timeouts.
- Eviction is the server's (`maxmemory` with an LRU policy): nothing here deletes for
  capacity; the advisory size is only compared with the server's `maxmemory` at start.
- A fault never fails a request: connection refused or lost, timeout, a corrupt or
  foreign value, the server out of memory are counted by kind, logged at most once a
  minute per kind, and the chunk is recomputed locally. After a connection fault or a
  timeout the tier backs off (0.5 s doubling to 8 s; lookups and writes are skipped,
  and counted, meanwhile) and then tries again: a restarted server is picked up without
  restarting vLLM.

The redis client (PyPI `redis`, with `hiredis` for parsing speed) is imported only
when a remote tier is built.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from vllm_kvflow.store.chunk_format import CorruptEntry, ForeignEntry, decode, encode
from vllm_kvflow.store.entry import ChunkKV

logger = logging.getLogger("vllm_kvflow.store")

KEY_PREFIX = "kvflow"
# URL schemes: one node (redis-py's own), or a cluster reached through any of its nodes.
NODE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
ERROR_KINDS = ("connection", "timeout", "corrupt", "foreign", "oom", "other")
LOG_EVERY_S = 60.0
DEFAULT_QUEUE_BYTES = 256 << 20
# Policies under which the server evicts our keys (they carry no TTL) when full.
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def check_url(url: str) -> str:
    """url if its scheme is one the remote tier speaks; else ValueError."""
    parts = urlsplit(url) if isinstance(url, str) else None
    known = parts is not None and (parts.scheme in NODE_SCHEMES or parts.scheme in CLUSTER_SCHEMES)
    if not known or not url.startswith(parts.scheme + "://") or not (
            parts.hostname if parts.scheme != "unix" else parts.path):
        raise ValueError(f"kvflow: store_remote_url must start with one of "
                         f"{[s + '://' for s in (*NODE_SCHEMES, *CLUSTER_SCHEMES)]} and name a host "
                         f"(unix://: a path), got {url!r}")
    return url


def redacted(url: str) -> str:
    """url without its password (for logs and stats)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def connect(url: str, connect_timeout_s: float, timeout_s: float):
    """A redis-py client for url, failing fast: no retries of its own (the tier backs
    off instead), bounded connect and socket timeouts."""
    import redis  # only when a remote tier is configured
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    opts = dict(socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0))
    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        from redis.cluster import RedisCluster

        node_url = urlunsplit(urlsplit(url)._replace(scheme=CLUSTER_SCHEMES[scheme]))
        return RedisCluster.from_url(node_url, **opts)  # connects: reads the slot map
    return redis.Redis.from_url(url, **opts)


def error_kind(e: BaseException) -> str:
    from redis import exceptions as rx

    if isinstance(e, (rx.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, rx.OutOfMemoryError):
        return "oom"
    if isinstance(e, (rx.ConnectionError, rx.ClusterDownError, rx.RedisClusterException,
                      ConnectionError, OSError)):
        return "connection"
    return "other"


@dataclass
class RemoteCounters:
    hits: int = 0
    misses: int = 0  # the server answered: no such key
    inserts: int = 0  # values the server acknowledged
    writes_dropped: int = 0  # write queue full
    writes_skipped: int = 0  # server unavailable (backing off)
    lookups_skipped: int = 0  # server unavailable (backing off): a local miss
    bytes_read: int = 0
    read_s: float = 0.0  # GET round trips, bytes included
    verify_s: float = 0.0  # decoding and checksum of what was read
    bytes_written: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))


class _Backoff:
    """After a connection fault or timeout: wait 0.5 s, doubling to 8 s, before the
    next attempt; a success resets it."""

    FIRST_S, LONGEST_S = 0.5, 8.0

    def __init__(self):
        self._lock = threading.Lock()
        self._delay = 0.0
        self._until = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._until

    def failed(self) -> None:
        with self._lock:
            self._delay = min(max(self._delay * 2, self.FIRST_S), self.LONGEST_S)
            self._until = time.monotonic() + self._delay

    def succeeded(self) -> None:
        with self._lock:
            self._delay, self._until = 0.0, 0.0


class _RateLimitedLog:
    """One warning per kind per LOG_EVERY_S, saying how many were not logged."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every_s:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            self._last[kind] = now
            quiet = self._quiet.pop(kind, 0)
        suffix = f" ({quiet} more {kind} faults since the last such line)" if quiet else ""
        logger.warning("kvflow: remote tier: " + msg + suffix, *args)


class RemoteTier:
    """url: `redis://host:port/db`, `rediss://...` (TLS), `unix:///path.sock`, or
    `redis+cluster://host:port` / `rediss+cluster://...` (any node of a cluster).
    capacity_bytes: advisory (the server's maxmemory is what holds); None: unknown."""

    name = "remote"

    def __init__(self, url: str, identity: str, capacity_bytes: int | None = None, *,
                 connect_timeout_s: float = 0.5, timeout_s: float = 1.0,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES):
        self.url = check_url(url)
        try:
            import redis  # noqa: F401 - fail here, clearly, not on the writer thread
        except ImportError as e:
            raise ImportError("kvflow: store_remote_url needs the redis package "
                              "(pip install redis hiredis; scripts/install.sh pins them)") from e
        self.identity = identity
        self.capacity_bytes = capacity_bytes
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.queue_bytes = queue_bytes
        self.prefix = f"{KEY_PREFIX}:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:"
        self.counters = RemoteCounters()
        self._backoff = _Backoff()
        self._log = _RateLimitedLog()
        self._client = None
        self._client_lock = threading.Lock()
        self._cond = threading.Condition()  # guards the queue and the counters
        self._pending: OrderedDict[str, ChunkKV] = OrderedDict()  # queued or being written
        self._pending_bytes = 0
        self._deletes: deque[str] = deque()  # remote keys of corrupt values
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kvflow-remote-writer",
                                        daemon=True)
        self._writer.start()
        atexit.register(self.close)

    def remote_key(self, key: str) -> str:
        return self.prefix + key

    # -- reads (request thread) ---------------------------------------------------------------
    def get(self, key: str, count_miss: bool = True) -> ChunkKV | None:
        """The verified entry, or None: absent, unavailable, or faulty (counted, logged).
        The caller checks token ids and counts the hit. count_miss=False: a second look
        for a key whose miss was counted already. Never raises."""
        with self._cond:
            pending = self._pending.get(key)
            if pending is not None:
                return pending  # written soon: still the tier's to serve
            if not self._backoff.ready():
                self.counters.lookups_skipped += 1
                return None
        t0 = time.perf_counter()
        try:
            data = self._redis().get(self.remote_key(key))
        except Exception as e:  # noqa: BLE001 - a remote fault is a local miss
            self._fault(e, "reading", key)
            return None
        t1 = time.perf_counter()
        self._backoff.succeeded()
        if data is None:
            if count_miss:
                with self._cond:
                    self.counters.misses += 1
            return None
        try:
            entry = decode(data, key, self.identity)
        except (CorruptEntry, ForeignEntry) as e:
            kind = "corrupt" if isinstance(e, CorruptEntry) else "foreign"
            self._count(kind)
            self._log.warn(kind, "%s value of chunk %s skipped%s: %s", kind, key[:16],
                           ", deleted" if kind == "corrupt" else "", e)
            if kind == "corrupt":
                with self._cond:
                    self._deletes.append(self.remote_key(key))
                    self._cond.notify_all()
            return None
        with self._cond:
            self.counters.bytes_read += len(data)
            self.counters.read_s += t1 - t0
            self.counters.verify_s += time.perf_counter() - t1
        return entry

    # -- writes ---------------------------------------------------------------------------------
    def enqueue(self, key: str, entry: ChunkKV) -> bool:
        """Queue entry for writing; True if queued. Never waits: a full queue, or a
        server that is unavailable, drops the write (counted)."""
        with self._cond:
            if key in self._pending:
                return True
            if self._closed:
                return False
            if not self._backoff.ready():
                self.counters.writes_skipped += 1
                return False
            # An empty queue takes any entry, so one larger than queue_bytes still goes.
            if self._pending and self._pending_bytes + entry.nbytes > self.queue_bytes:
                self.counters.writes_dropped += 1
                return False
            self._pending[key] = entry
            self._pending_bytes += entry.nbytes
            self._cond.notify_all()
            return True

    def discard(self, key: str) -> None:
        """Delete key on the server (from the writer thread)."""
        with self._cond:
            self._deletes.append(self.remote_key(key))
            self._cond.notify_all()

    def _write_loop(self) -> None:
        self._check_server()
        while True:
            with self._cond:
                while not self._pending and not self._deletes and not self._closed:
                    self._cond.wait()
                doomed = self._deletes[0] if self._deletes else None
                if doomed is None and not self._pending:
                    return  # closed and drained
                if doomed is None:
                    key, entry = next(iter(self._pending.items()))
            if doomed is not None:
                self._delete(doomed)
                with self._cond:
                    self._deletes.popleft()  # after the DEL: flush() waits for it
                    self._cond.notify_all()
                continue
            self._write(key, entry)
            with self._cond:
                del self._pending[key]
                self._pending_bytes -= entry.nbytes
                self._cond.notify_all()

    def _write(self, key: str, entry: ChunkKV) -> None:
        if not self._backoff.ready():
            with self._cond:
                self.counters.writes_skipped += 1
            return
        try:
            data = encode(key, self.identity, entry)
            self._redis().set(self.remote_key(key), data)
        except Exception as e:  # noqa: BLE001 - a failed write only loses a cache entry
            self._fault(e, "writing", key)
            return
        self._backoff.succeeded()
        with self._cond:
            self.counters.inserts += 1
            self.counters.bytes_written += len(data)

    def _delete(self, remote_key: str) -> None:
        """DEL (rare: a corrupt value, or discard); skipped while unavailable."""
        if not self._backoff.ready():
            return
        try:
            self._redis().delete(remote_key)
        except Exception as e:  # noqa: BLE001
            self._fault(e, "deleting", remote_key[len(self.prefix):])

    def flush(self) -> None:
        with self._cond:
            while self._pending or self._deletes:
                self._cond.wait()

    def close(self) -> None:
        """Write what is queued (each write bounded by the socket timeout; none while
        the server is unavailable), then stop the writer. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        atexit.unregister(self.close)
        with self._client_lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass

    # -- connection and faults ----------------------------------------------------------------
    def _redis(self):
        with self._client_lock:
            if self._client is None:
                self._client = connect(self.url, self.connect_timeout_s, self.timeout_s)
            return self._client

    def _fault(self, e: Exception, doing: str, key: str) -> None:
        kind = error_kind(e)
        if kind in ("connection", "timeout"):
            self._backoff.failed()
            if urlsplit(self.url).scheme in CLUSTER_SCHEMES:
                with self._client_lock:
                    self._client = None  # read the slot map again on the next attempt
        self._count(kind)
        self._log.warn(kind, "%s fault %s chunk %s at %s (the chunk is computed locally): %s: %s",
                       kind, doing, key[:16], redacted(self.url), type(e).__name__, e)

    def _count(self, kind: str) -> None:
        with self._cond:
            self.counters.errors[kind] += 1

    def _check_server(self) -> None:
        """Once, from the writer thread: is the server reachable, and will it evict our
        keys when full? Logged, never raised (CONFIG may be disabled on managed servers)."""
        try:
            client = self._redis()
            client.ping()
            config = client.config_get("maxmemory*")
        except Exception as e:  # noqa: BLE001
            if error_kind(e) in ("connection", "timeout"):
                self._fault(e, "checking the server for", "-")
            else:
                logger.info("kvflow: remote tier %s: server settings not readable (%s)",
                            redacted(self.url), e)
            return
        if isinstance(config, dict) and config and not any(isinstance(v, dict) for v in config.values()):
            policy = config.get("maxmemory-policy")
            maxmemory = int(config.get("maxmemory") or 0)
            if maxmemory == 0 or policy not in EVICTING_POLICIES:
                logger.warning("kvflow: remote tier %s: the server has maxmemory %d and policy "
                               "%s: it will not evict chunks when full (set maxmemory and "
                               "maxmemory-policy allkeys-lru; README, Shared tier)",
                               redacted(self.url), maxmemory, policy)
            elif self.capacity_bytes is not None and maxmemory != self.capacity_bytes:
                logger.info("kvflow: remote tier %s: server maxmemory %d B, store_remote_gb "
                            "says %d B (advisory; the server's holds)", redacted(self.url),
                            maxmemory, self.capacity_bytes)
        logger.info("kvflow: remote tier %s reachable", redacted(self.url))

    def stats(self) -> dict:
        with self._cond:
            c = self.counters
            return {"url": redacted(self.url), "available": self._backoff.ready(),
                    "capacity_bytes": self.capacity_bytes, "queued": len(self._pending),
                    "queued_bytes": self._pending_bytes,
                    **{k: v for k, v in c.__dict__.items() if k != "errors"},
                    "errors": dict(c.errors)}

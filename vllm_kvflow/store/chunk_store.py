"""Position-independent chunk KV store, in tiers: device memory -> host RAM -> disk.

A chunk's identity is a hash of (model, namespace, sink, token ids) only, never of what
precedes it in a prompt, so the same document hits wherever it is placed. A hit verifies
the token ids, not only the hash.

Memory tiers (tiers.py) are LRU in bytes and exclusive: what one evicts is demoted to
the next, and a hit in a lower tier is promoted to the first. The disk tier (disk.py) is
write-through: every new chunk is queued for a background write, so a restart finds it
whether or not it was ever evicted; demotion to disk is then a no-op. The remote tier
(remote.py, a Redis/Valkey server shared by replicas) is below the disk, written
through in the same way; a hit there is promoted to memory (and written to disk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_kvflow.store.entry import ChunkKV
from vllm_kvflow.store.tiers import MemoryTier

if TYPE_CHECKING:
    from vllm_kvflow.store.disk import DiskTier
    from vllm_kvflow.store.remote import RemoteTier


@dataclass
class StoreCounters:
    hits: int = 0  # found in any tier (per-tier hits: stats()["tiers"])
    misses: int = 0  # in no tier, or only in a corrupt/foreign disk file
    inserts: int = 0
    evictions: int = 0  # left the store's last tier (disk if any, else the last memory tier)
    rejected_too_large: int = 0  # fits no tier
    hash_collisions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ChunkStore:
    """Chunk KV in memory tiers (first = fastest) and an optional disk tier.

    ChunkStore(capacity_bytes) is one host-memory tier, as before tiers existed.
    len() and nbytes count the memory tiers (what is resident); stats() has every tier.
    Not thread-safe: one per worker process (the writer threads of the disk and remote
    tiers are internal). `in` and len() never ask the remote tier (no network there).
    """

    def __init__(self, capacity_bytes: int | None = None, counters: StoreCounters | None = None,
                 *, tiers: list[MemoryTier] | None = None, disk: DiskTier | None = None,
                 remote: RemoteTier | None = None):
        if (capacity_bytes is None) == (tiers is None):
            raise ValueError("give exactly one of capacity_bytes or tiers")
        self.tiers = list(tiers) if tiers is not None else [MemoryTier("host", capacity_bytes)]
        if not self.tiers:
            raise ValueError("a chunk store needs at least one memory tier")
        self.counters = counters or StoreCounters()
        self.disk = disk
        self.remote = remote
        if disk is not None:
            disk.on_evict = self._count_eviction

    @property
    def capacity_bytes(self) -> int:
        """Capacity of the first memory tier (the old single-tier meaning)."""
        return self.tiers[0].capacity_bytes

    def __len__(self) -> int:
        return sum(len(t) for t in self.tiers)

    def __contains__(self, key: str) -> bool:
        return any(key in t for t in self.tiers) or (self.disk is not None and key in self.disk)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers)

    def keys_lru_order(self) -> list[str]:
        """Keys of the memory tiers, from least to most recently used: the last tier's
        first (it holds what the tiers above evicted)."""
        return [k for t in reversed(self.tiers) for k in t.keys_lru_order()]

    def get(self, key: str, token_ids) -> ChunkKV | None:
        """The entry for key if its token ids match exactly, promoted to the first tier
        that fits it; refreshes its LRU rank."""
        tokens = tuple(token_ids)  # numpy ints compare equal to ints: no conversion
        for level, tier in enumerate(self.tiers):
            entry = tier.get(key)
            if entry is not None:
                if not self._verify(entry, tokens):
                    return None
                tier.counters.hits += 1
                if level > 0:
                    tier.pop(key)
                    entry = self._insert(0, key, entry) or entry
                return self._hit(entry)
        entry = self.disk.get(key) if self.disk is not None else None
        if entry is not None:
            if not self._verify(entry, tokens):
                return None
            self.disk.counters.hits += 1
            # The file stays: the disk tier is write-through, so it already holds it.
            return self._hit(self._insert(0, key, entry) or entry)
        entry = self.remote.get(key) if self.remote is not None else None
        if entry is None:
            self.counters.misses += 1
            return None
        return self._remote_hit(key, entry, tokens)

    def get_shared(self, key: str, token_ids) -> ChunkKV | None:
        """A chunk that another replica may have stored since this store last missed it:
        the remote tier only (None without one), promoted like a hit; a miss is not
        counted again. For a computation about to start, that a fetch may spare."""
        entry = self.remote.get(key, count_miss=False) if self.remote is not None else None
        return None if entry is None else self._remote_hit(key, entry, tuple(token_ids))

    def _remote_hit(self, key: str, entry: ChunkKV, tokens: tuple[int, ...]) -> ChunkKV | None:
        """A remote entry verified and promoted (to memory, and the disk if any)."""
        if not self._verify(entry, tokens):
            return None
        self.remote.counters.hits += 1
        if self.disk is not None:
            self.disk.enqueue(key, entry, wait=False)
        return self._hit(self._insert(0, key, entry) or entry)

    def put(self, key: str, entry: ChunkKV) -> bool:
        """Insert (or replace) an entry, demoting LRU entries to fit. False if no tier
        can hold it."""
        entry.mark_computed()  # the disk and remote writers read it on their own threads
        for tier in self.tiers:
            tier.pop(key)
        stored = self._insert(0, key, entry)
        # Write-through never blocks the request path: a full queue drops the write
        # (the entry is queued again, waiting, if it is ever demoted out of memory).
        on_disk = self.disk is not None and self.disk.enqueue(key, entry, wait=False)
        remote = self.remote is not None and self.remote.enqueue(key, entry)
        if stored is None and not on_disk and not remote:
            self.counters.rejected_too_large += 1
            return False
        self.counters.inserts += 1
        return True

    def discard(self, key: str) -> None:
        """Remove key from every tier, its disk file included."""
        for tier in self.tiers:
            tier.pop(key)
        if self.disk is not None:
            self.disk.discard(key)
        if self.remote is not None:
            self.remote.discard(key)

    def clear(self) -> None:
        """Empty the memory tiers (disk and remote keep theirs: discard() removes one)."""
        for tier in self.tiers:
            tier.clear()

    def flush(self) -> None:
        """Wait until queued disk and remote writes are done."""
        for tier in (self.disk, self.remote):
            if tier is not None:
                tier.flush()

    def close(self) -> None:
        """Flush and stop the disk and remote writers (on worker shutdown and at exit)."""
        for tier in (self.disk, self.remote):
            if tier is not None:
                tier.close()

    def stats(self) -> dict:
        """Resident entries/bytes, the store counters, and each tier's own stats."""
        tiers = {t.name: t.stats() for t in self.tiers}
        if self.disk is not None:
            tiers["disk"] = self.disk.stats()
        if self.remote is not None:
            tiers["remote"] = self.remote.stats()
        return {"entries": len(self), "bytes": self.nbytes, **self.counters.as_dict(),
                "tiers": tiers}

    # -- internals ------------------------------------------------------------------------
    def _verify(self, entry: ChunkKV, tokens: tuple[int, ...]) -> bool:
        if entry.token_ids == tokens:
            return True
        self.counters.hash_collisions += 1
        self.counters.misses += 1
        return False

    def _hit(self, entry: ChunkKV) -> ChunkKV:
        self.counters.hits += 1
        return entry

    def _insert(self, level: int, key: str, entry: ChunkKV) -> ChunkKV | None:
        """Put entry in the first memory tier from `level` on that can hold it, moved to
        that tier's device; what that evicts is demoted. None if no tier can hold it."""
        for i in range(level, len(self.tiers)):
            tier = self.tiers[i]
            if tier.fits(entry):
                stored = entry.to(tier.device)
                for old_key, old in tier.put(key, stored):
                    self._demote(i + 1, old_key, old)
                return stored
        return None

    def _demote(self, level: int, key: str, entry: ChunkKV) -> None:
        if self._insert(level, key, entry) is not None:
            return
        # Off the last memory tier: the disk keeps it (already written, or written now,
        # waiting for queue room since memory no longer holds it), else it is gone.
        if self.disk is not None and self.disk.enqueue(key, entry, wait=True):
            return
        self._count_eviction(key)

    def _count_eviction(self, key: str) -> None:
        self.counters.evictions += 1

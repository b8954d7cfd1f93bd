"""Disk tier of the chunk store: one safetensors file per chunk, in one directory.

File `<sha256(key)[:32]>.<tag>.safetensors`, tag = sha256(identity)[:16], in the
self-checking format of chunk_format.py (header with model identity, key, token ids
and a checksum over all of it; KV of another model or layout is never used).

- Writes run on a background thread from a queue bounded in bytes; each goes to a temp
  file, is fsynced, then renamed, so a final name only ever holds a complete file.
- Start-up indexes this identity's files (header and size only, oldest first by mtime,
  so LRU order survives a restart); every read checks size, header and checksum.
- A truncated or corrupt file is logged, deleted and counted, never used.
- Only regular files are ever opened (a FIFO would block the reader; a device could be
  anything), checked before and after opening. A file that cannot be read (a directory
  or FIFO under its name, permissions, an I/O error) is dropped from the index, logged
  and counted (`read_errors`) and left in place; its chunk is recomputed, and the
  write-through replaces it where it can.
- The start-up scan is bounded in time (`scan_seconds`): it reads the newest files
  first, and what it has not read by then is logged, counted and treated as absent.
- Crash: queued, unwritten chunks are lost (they are recomputed on their next miss);
  a half-written temp file is never indexed and is swept on the next start.
One process per (directory, identity): processes of different identity (other models,
tensor-parallel ranks) may share a directory; replicas of one model should not.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vllm_kvflow.store.chunk_format import (
    MAX_HEADER_BYTES,
    CorruptEntry,
    ForeignEntry,
    check_meta,
    decode,
    encode,
    parse_header,
)
from vllm_kvflow.store.entry import ChunkKV

logger = logging.getLogger("vllm_kvflow.store")

SUFFIX = ".safetensors"
DEFAULT_QUEUE_BYTES = 256 << 20
DEFAULT_SCAN_SECONDS = 30.0
__all__ = ["DiskTier", "parse_header"]  # parse_header: for tools reading files directly


class NotRegularFile(OSError):
    """A directory, FIFO, device, socket or link under a store file's name."""


@dataclass
class DiskCounters:
    hits: int = 0
    inserts: int = 0  # files written
    evictions: int = 0  # files deleted for capacity
    corrupt_skipped: int = 0  # truncated / checksum or header mismatch: deleted
    foreign_skipped: int = 0  # another identity's header under our name: left alone
    write_errors: int = 0
    writes_dropped: int = 0  # write-through skipped because the queue was full
    rejected_too_large: int = 0
    read_errors: int = 0  # unreadable (not a regular file, permissions, I/O): dropped, left
    scan_unindexed: int = 0  # files the start-up scan had no time left to index: absent


def read_regular_file(path: Path, limit: int = -1) -> tuple[bytes, os.stat_result]:
    """Up to limit bytes (-1: all) of the regular file at path, and its stat. Anything
    else raises NotRegularFile without being opened; O_NONBLOCK and a second check on
    the open descriptor cover a FIFO swapped in between (its open does not wait for a
    writer), O_NOFOLLOW a link."""
    kind = _kind(os.lstat(path).st_mode)
    if kind is not None:
        raise NotRegularFile(f"{path} is {kind}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise NotRegularFile(f"{path} is {kind}, not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        return f.read(limit), st


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return f"of mode {oct(mode)}"


class DiskTier:
    def __init__(self, path: str | os.PathLike, capacity_bytes: int, identity: str,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES, scan_seconds: float = DEFAULT_SCAN_SECONDS):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.scan_seconds = scan_seconds
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.identity = identity
        self.tag = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.queue_bytes = queue_bytes
        self.counters = DiskCounters()
        self.on_evict: Callable[[str], None] | None = None
        self._cond = threading.Condition()  # guards everything below
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, LRU order
        self._bytes = 0
        self._pending: OrderedDict[str, ChunkKV] = OrderedDict()  # queued or being written
        self._pending_bytes = 0
        self._closed = False
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kvflow-disk-writer",
                                        daemon=True)
        self._writer.start()
        atexit.register(self.close)  # flush queued writes on a normal interpreter exit

    # -- lookups (request thread) ----------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        with self._cond:
            return key in self._index or key in self._pending

    def __len__(self) -> int:
        with self._cond:
            return len(self._index)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys_lru_order(self) -> list[str]:
        with self._cond:
            return list(self._index)

    def file_for(self, key: str) -> Path:
        return self.path / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.{self.tag}{SUFFIX}"

    def get(self, key: str) -> ChunkKV | None:
        """The verified entry, or None (absent, corrupt -> deleted, foreign -> skipped).
        The caller checks token ids and counts the hit."""
        with self._cond:
            pending = self._pending.get(key)
            if pending is not None:
                return pending  # queued for writing: still the tier's to serve
            size = self._index.get(key)
            if size is None:
                return None
            self._index.move_to_end(key)
        path = self.file_for(key)
        try:
            # One byte more than indexed: a grown file is caught by the size check
            # without reading all of whatever now sits under the name.
            data, _ = read_regular_file(path, size + 1)
        except FileNotFoundError:
            self._forget(key)  # deleted behind our back
            return None
        except OSError as e:
            self._read_fault(path, key, e)
            return None
        try:
            os.utime(path)  # mtime is the LRU rank a restart sees
        except OSError:
            pass  # readable but not ours to touch: only the rank after a restart is lost
        try:
            return decode(data, key, self.identity)
        except CorruptEntry as e:
            self._reject(path, key, str(e))
        except ForeignEntry as e:
            self._skip_foreign(path, key, str(e))
        return None

    # -- writes ------------------------------------------------------------------------------
    def enqueue(self, key: str, entry: ChunkKV, wait: bool) -> bool:
        """Queue entry for writing. True if it is (or will be) on disk. wait=False drops
        the write when the queue is full; wait=True waits for room."""
        with self._cond:
            if key in self._index or key in self._pending:
                return True
            if self._closed:
                return False
            if entry.nbytes > self.capacity_bytes:
                self.counters.rejected_too_large += 1
                return False
            # An empty queue takes any entry, so one larger than queue_bytes still goes.
            while self._pending and self._pending_bytes + entry.nbytes > self.queue_bytes:
                if not wait:
                    self.counters.writes_dropped += 1
                    return False
                self._cond.wait()
                if self._closed:
                    return False
            self._pending[key] = entry
            self._pending_bytes += entry.nbytes
            self._cond.notify_all()
            return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                key, entry = next(iter(self._pending.items()))
            try:
                size = self._write_file(key, entry)
            except Exception as e:  # noqa: BLE001 - a failed write only loses a cache entry
                logger.warning("kvflow: writing chunk %s to %s failed: %s", key[:16], self.path, e)
                size = None
            with self._cond:
                del self._pending[key]
                self._pending_bytes -= entry.nbytes
                if size is None:
                    self.counters.write_errors += 1
                else:
                    self._bytes += size - self._index.pop(key, 0)
                    self._index[key] = size
                    self.counters.inserts += 1
                    self._evict_over_capacity()
                self._cond.notify_all()

    def _write_file(self, key: str, entry: ChunkKV) -> int:
        data = encode(key, self.identity, entry)
        final = self.file_for(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not outrun the data
            os.replace(tmp, final)  # atomic: readers see the old file or the whole new one
        finally:
            tmp.unlink(missing_ok=True)
        return len(data)

    def _evict_over_capacity(self) -> None:
        """Delete least recently used files until within capacity. Holds the lock."""
        while self._bytes > self.capacity_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._bytes -= size
            _unlink(self.file_for(key))
            self.counters.evictions += 1
            if self.on_evict is not None:
                self.on_evict(key)

    def discard(self, key: str) -> None:
        """Forget key and delete its file (a queued write still lands; rare and harmless)."""
        self._forget(key)
        _unlink(self.file_for(key))

    def flush(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()

    def close(self) -> None:
        """Write what is queued, then stop the writer. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        atexit.unregister(self.close)

    # -- start-up and bad files ---------------------------------------------------------------
    def _scan(self) -> None:
        deadline = time.monotonic() + self.scan_seconds
        self._sweep_temp_files()
        files, listed_all = self._list_files(deadline)
        files.sort(reverse=True)  # newest first: if time runs out, the recently used are in
        found, unread = [], 0
        for done, (mtime, path) in enumerate(files):
            if time.monotonic() > deadline:
                unread = len(files) - done
                break
            try:
                prefix, st = read_regular_file(path, 8 + MAX_HEADER_BYTES)
                meta, size = parse_header(prefix)
                if size != st.st_size:
                    raise CorruptEntry(f"size {st.st_size} B, header says {size} B (truncated?)")
                check_meta(meta, self.identity, None)
                key = meta.get("key", "")
                if self.file_for(key) != path:
                    raise CorruptEntry("file name does not match the key in its header")
            except FileNotFoundError:
                continue
            except OSError as e:
                self._read_fault(path, None, e)
                continue
            except CorruptEntry as e:
                self._reject(path, None, str(e))
                continue
            except ForeignEntry as e:
                self._skip_foreign(path, None, str(e))
                continue
            found.append((mtime, key, size))
        if unread or not listed_all:
            self._scan_ran_out(unread, listed_all)
        for _, key, size in sorted(found):  # oldest first: the LRU order of the last run
            self._index[key] = size
            self._bytes += size
        with self._cond:
            self._evict_over_capacity()  # capacity may have shrunk since the last run
        if self._index:
            logger.info("kvflow: disk tier %s: %d chunks, %d B from a previous run",
                        self.path, len(self._index), self._bytes)

    def _list_files(self, deadline: float) -> tuple[list[tuple[int, Path]], bool]:
        """(mtime, path) of the regular files named like ours (others are read faults),
        and whether the whole directory was listed before the deadline."""
        suffix = f".{self.tag}{SUFFIX}"
        files = []
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if time.monotonic() > deadline:
                        return files, False
                    if entry.name.startswith(".") or not entry.name.endswith(suffix):
                        continue
                    path = Path(entry.path)
                    try:
                        st = entry.stat(follow_symlinks=False)
                        kind = _kind(st.st_mode)
                        if kind is not None:
                            raise NotRegularFile(f"{path} is {kind}, not a regular file")
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        self._read_fault(path, None, e)
                        continue
                    files.append((st.st_mtime_ns, path))
        except OSError as e:
            logger.warning("kvflow: disk tier %s: cannot list the directory (%s); starting "
                           "with the %d files listed", self.path, e, len(files))
        return files, True

    def _scan_ran_out(self, unread: int, listed_all: bool) -> None:
        self.counters.scan_unindexed += unread
        logger.warning("kvflow: disk tier %s: start-up scan stopped at its %.1f s limit; "
                       "%d listed files not indexed%s, treated as absent", self.path,
                       self.scan_seconds, unread, "" if listed_all else " and the rest unlisted")

    def _sweep_temp_files(self) -> None:
        """Delete temp files of our identity left by a writer that died mid-write."""
        for path in self.path.glob(f".*.{self.tag}{SUFFIX}.*.tmp"):
            try:
                pid = int(path.name.rsplit(".", 2)[-2])
                if pid != os.getpid():
                    os.kill(pid, 0)
                    continue  # that writer is alive: its rename is coming
            except ProcessLookupError:
                pass
            except (ValueError, PermissionError):
                continue
            if not path.is_symlink() and path.is_file():
                _unlink(path)

    def _reject(self, path: Path, key: str | None, why: str) -> None:
        logger.warning("kvflow: corrupt chunk file %s skipped and deleted: %s", path, why)
        with self._cond:
            self.counters.corrupt_skipped += 1
        if key is not None:
            self._forget(key)
        _unlink(path)

    def _read_fault(self, path: Path, key: str | None, error: OSError) -> None:
        """Drop an unreadable file's entry. Logged once per entry: once dropped, the key
        is not looked up on disk again unless a new write of it succeeds."""
        logger.warning("kvflow: cannot read chunk file %s, dropped from the disk tier (its "
                       "chunk is recomputed): %s", path, error)
        with self._cond:
            self.counters.read_errors += 1
        if key is not None:
            self._forget(key)

    def _skip_foreign(self, path: Path, key: str | None, why: str) -> None:
        logger.warning("kvflow: chunk file %s of another model skipped: %s", path, why)
        with self._cond:
            self.counters.foreign_skipped += 1
        if key is not None:
            self._forget(key)

    def _forget(self, key: str) -> None:
        with self._cond:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size

    def stats(self) -> dict:
        with self._cond:
            return {"entries": len(self._index), "bytes": self._bytes,
                    "capacity_bytes": self.capacity_bytes, "queued": len(self._pending),
                    "queued_bytes": self._pending_bytes, **self.counters.__dict__}


def _unlink(path: Path) -> None:
    """Delete a file of ours; one that cannot be deleted (a directory under its name, a
    read-only directory) is logged and left, never fatal to a read or to the writer."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("kvflow: cannot delete %s: %s", path, e)

"""Disk faults never stick: a store file that cannot be read (a directory, FIFO or link
under its name, no permission, an I/O error) is dropped from the index, counted and
logged once, and its chunk is a miss (recomputed by the caller); non-regular files are
never opened; the start-up scan is bounded in time. Real files, directories and FIFOs."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from vllm_kvflow.store import ChunkKV, ChunkStore, MemoryTier
from vllm_kvflow.store import disk as disk_module
from vllm_kvflow.store.disk import DiskTier

ID = "model=m|dtype=float32|layers=2|kv_heads=2|head_size=4|tp0/1"
TOKENS = (1, 2)


def _entry(seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn((2, 2, 2, 4), generator=g), torch.randn((2, 2, 2, 4), generator=g)
    return ChunkKV(TOKENS, k, v, local_start=1)


def _within(seconds, fn, *args):
    """fn(*args) in a thread; fails (instead of hanging the suite) if it blocks."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("v", fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for more than {seconds} s"
    return out.get("v")


@pytest.fixture
def stores(tmp_path):
    """make(path=tmp_path) -> a disk-only store (no memory tier holds an entry, so every
    get reads the disk); all closed at the end."""
    made = []

    def make(path=tmp_path, **disk_kwargs):
        disk = DiskTier(path, 1 << 20, ID, **disk_kwargs)
        store = ChunkStore(tiers=[MemoryTier("host", 0)], disk=disk)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _stored(make, key="k", seed=0, **kwargs) -> tuple[ChunkStore, Path]:
    store = make(**kwargs)
    assert store.put(key, _entry(seed))
    store.flush()
    path = store.disk.file_for(key)
    assert path.is_file() and store.get(key, TOKENS) is not None
    return store, path


def _faults(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot read chunk file" in r.getMessage()]


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _replace_with_link(path: Path) -> None:
    target = path.with_name("elsewhere.bin")
    path.rename(target)  # a valid file, reached only through a link: still never followed
    path.symlink_to(target)


REPLACEMENTS = {"directory": _replace_with_dir, "fifo": _replace_with_fifo,
                "symlink": _replace_with_link}


@pytest.mark.parametrize("kind", sorted(REPLACEMENTS))
def test_non_regular_file_under_a_chunks_name_is_a_miss_logged_once(stores, caplog, kind):
    store, path = _stored(stores)
    REPLACEMENTS[kind](path)
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        assert _within(10, store.get, "k", TOKENS) is None
        assert _within(10, store.get, "k", TOKENS) is None  # dropped: not looked up again
    disk = store.disk.stats()
    assert disk["read_errors"] == 1 and disk["entries"] == 0 and disk["corrupt_skipped"] == 0
    assert store.counters.misses == 2 and "k" not in store
    assert len(_faults(caplog)) == 1 and "not a regular file" in _faults(caplog)[0]
    assert path.exists() or path.is_symlink()  # not ours to delete: left in place


def test_recomputed_chunk_replaces_a_fifo_and_is_served_again(stores):
    store, path = _stored(stores)
    _replace_with_fifo(path)
    assert _within(10, store.get, "k", TOKENS) is None
    assert store.put("k", _entry())  # the caller recomputed it
    store.flush()
    assert stat.S_ISREG(os.lstat(path).st_mode)  # the write-through renamed over the FIFO
    assert _within(10, store.get, "k", TOKENS) is not None


def test_recomputed_chunk_over_a_directory_fails_its_write_and_keeps_serving_misses(stores, caplog):
    store, path = _stored(stores)
    _replace_with_dir(path)
    assert store.get("k", TOKENS) is None
    assert store.put("k", _entry())
    store.flush()  # the write cannot rename over a directory: counted, never raised
    assert store.disk.stats()["write_errors"] == 1 and store.disk.stats()["read_errors"] == 1
    assert store.get("k", TOKENS) is None and path.is_dir()
    assert store.put("other", _entry(seed=1)) and (store.flush() or True)
    assert store.get("other", TOKENS) is not None  # the writer thread survived


def test_simulated_io_error_is_a_miss_logged_once(stores, caplog, monkeypatch):
    """EIO cannot be produced on demand by a local filesystem; the read raises it here."""
    store, path = _stored(stores)
    calls = []

    def failing_read(p, limit=-1):
        calls.append(p)
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(p))

    monkeypatch.setattr(disk_module, "read_regular_file", failing_read)
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        assert store.get("k", TOKENS) is None and store.get("k", TOKENS) is None
    assert calls == [path] and store.disk.stats()["read_errors"] == 1
    assert len(_faults(caplog)) == 1 and "Input/output error" in _faults(caplog)[0]
    assert path.is_file()  # an I/O error is no proof of corruption: left for a later run


@contextlib.contextmanager
def _unprivileged():
    """Run the body without root's power to read any file: as root, with the effective
    uid of `nobody` (real and saved uid stay 0, so it is restored after)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("root without CAP_SETUID: chmod 000 cannot stop root's reads, and "
                    "the effective uid cannot be dropped to test them honestly")
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def world_traversable_dir():
    # pytest's tmp_path sits under a 0700 directory that `nobody` cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="kvflow-perm-"))
    path.chmod(0o777)
    yield path
    for p in path.iterdir():
        with contextlib.suppress(OSError):
            p.chmod(0o600)
    shutil.rmtree(path, ignore_errors=True)


def test_permission_denied_file_is_a_miss_logged_once(stores, caplog, world_traversable_dir):
    store, path = _stored(stores, path=world_traversable_dir)
    path.chmod(0)
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"), _unprivileged():
        with pytest.raises(PermissionError):
            open(path, "rb")  # the premise: this process cannot read it
        assert store.get("k", TOKENS) is None and store.get("k", TOKENS) is None
    assert store.disk.stats()["read_errors"] == 1 and len(_faults(caplog)) == 1
    assert "Permission denied" in _faults(caplog)[0]


def test_permission_denied_file_is_skipped_by_the_start_up_scan(stores, world_traversable_dir):
    first, path = _stored(stores, path=world_traversable_dir)
    first.close()
    path.chmod(0)
    with _unprivileged():
        store = stores(path=world_traversable_dir)
        assert store.get("k", TOKENS) is None
    assert store.disk.stats()["read_errors"] == 1 and store.disk.stats()["entries"] == 0


@pytest.mark.parametrize("kind", sorted(REPLACEMENTS))
def test_start_up_scan_never_opens_non_regular_files(stores, tmp_path, kind):
    first, path = _stored(stores)
    assert first.put("good", _entry(seed=3))
    first.close()
    REPLACEMENTS[kind](path)
    # A directory and a FIFO named like a temp file of a dead writer: not swept, no error.
    tag = first.disk.tag
    (tmp_path / f".x.{tag}.safetensors.999999999.tmp").mkdir()
    os.mkfifo(tmp_path / f".y.{tag}.safetensors.999999998.tmp")
    store = _within(10, stores)
    disk = store.disk.stats()
    assert disk["entries"] == 1 and disk["read_errors"] == 1 and disk["corrupt_skipped"] == 0
    assert store.get("good", TOKENS) is not None and store.get("k", TOKENS) is None


def test_start_up_scan_stops_at_its_time_limit_newest_files_first(stores, tmp_path, monkeypatch,
                                                                  caplog):
    first = stores()
    for i in range(6):
        assert first.put(f"k{i}", _entry(seed=i))
    first.close()
    for i in range(6):  # k5 most recently used
        os.utime(first.disk.file_for(f"k{i}"), ns=(10**18 + i * 10**9,) * 2)

    # A clock that advances one second per file read: a limit of 2.5 s reads three.
    now = [0.0]
    real_read = disk_module.read_regular_file

    def slow_read(path, limit=-1):
        now[0] += 1.0
        return real_read(path, limit)

    monkeypatch.setattr(disk_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(disk_module, "read_regular_file", slow_read)
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        store = stores(scan_seconds=2.5)
    assert store.disk.keys_lru_order() == ["k3", "k4", "k5"]  # the newest, oldest first
    assert store.disk.stats()["scan_unindexed"] == 3
    assert "3 listed files not indexed" in caplog.text
    assert store.get("k0", TOKENS) is None  # absent: a miss, recomputed by the caller


def test_start_up_scan_with_no_time_indexes_nothing_and_says_so(stores, caplog):
    first = stores()
    for i in range(3):
        first.put(f"k{i}", _entry(seed=i))
    first.close()
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow.store"):
        store = stores(scan_seconds=0)
    assert len(store.disk) == 0 and "start-up scan stopped" in caplog.text


def test_unreadable_corrupt_file_that_cannot_be_deleted_is_not_fatal(stores, monkeypatch):
    store, path = _stored(stores)
    path.write_bytes(path.read_bytes()[:-5])  # truncated: corrupt, to be deleted

    def refuse(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    assert store.get("k", TOKENS) is None
    assert store.disk.stats()["corrupt_skipped"] == 1 and path.exists()


def test_file_grown_behind_our_back_is_read_only_to_its_indexed_size(stores, monkeypatch):
    store, path = _stored(stores)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.truncate(size + (1 << 30))  # sparse: a gigabyte more than the index knows
    reads = []
    real_read = disk_module.read_regular_file

    def counting_read(p, limit=-1):
        data, st = real_read(p, limit)
        reads.append(len(data))
        return data, st

    monkeypatch.setattr(disk_module, "read_regular_file", counting_read)
    assert store.get("k", TOKENS) is None
    assert reads == [size + 1] and store.disk.stats()["corrupt_skipped"] == 1

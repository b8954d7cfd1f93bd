"""The disk tier survives an engine restart: three fresh engine processes share only a
disk directory. The first computes the chunks, the second loads them from disk (no
recompute, same greedy tokens), the third finds one file corrupted, recomputes that
chunk and still answers the same."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from vllm_kvflow.store.disk import DiskTier, parse_header

pytestmark = pytest.mark.engine

CHILD = Path(__file__).with_name("store_restart_child.py")
MARK = "KVFLOW_RESULT "


def run_engine(disk_dir: Path) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(CHILD), str(disk_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"engine process: {time.perf_counter() - t0:.1f} s")
    return json.loads(lines[0][len(MARK):])


def test_disk_tier_hits_after_restart_and_skips_a_corrupt_file(tmp_path):
    disk_dir = tmp_path / "kv"

    first = run_engine(disk_dir)
    s1 = first["stats"]
    assert (s1["chunks"], s1["chunks_hit"], s1["chunks_missed"]) == (2, 0, 2)
    assert len(first["token_ids"]) > 0
    files = sorted(disk_dir.glob("*.safetensors"))
    assert len(files) == 2  # written through on exit at the latest
    original = {f.name: f.read_bytes() for f in files}

    second = run_engine(disk_dir)
    s2 = second["stats"]
    assert (s2["chunks_hit"], s2["chunks_missed"], s2["tokens_recomputed"]) == (2, 0, 0)
    disk = s2["store"]["tiers"]["disk"]
    assert disk["hits"] == 2 and disk["corrupt_skipped"] == 0 and disk["inserts"] == 0
    assert second["token_ids"] == first["token_ids"]

    # Flip one payload byte: the size and header stay valid, only the checksum catches it.
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0x01
    victim.write_bytes(bytes(data))

    third = run_engine(disk_dir)
    s3 = third["stats"]
    assert (s3["chunks_hit"], s3["chunks_missed"]) == (1, 1)
    disk = s3["store"]["tiers"]["disk"]
    assert disk["hits"] == 1 and disk["corrupt_skipped"] == 1
    assert third["token_ids"] == first["token_ids"]
    # The recomputed chunk was written again under the same name, and it verifies: its
    # KV matches the first run's (to float tolerance: recompute need not be bit-exact).
    assert sorted(f.name for f in disk_dir.glob("*.safetensors")) == sorted(original)
    meta, _ = parse_header(files[0].read_bytes()[:1 << 20])
    disk = DiskTier(disk_dir, 1 << 30, meta["identity"])
    try:
        for data in original.values():
            meta, _ = parse_header(data[:1 << 20])
            again, before = disk.get(meta["key"]), load(data)
            assert again is not None and disk.counters.corrupt_skipped == 0
            assert again.token_ids == tuple(before["token_ids"].tolist())
            assert torch.allclose(again.keys, before["keys"], atol=1e-4)
            assert torch.allclose(again.values, before["values"], atol=1e-4)
    finally:
        disk.close()

"""The stored chunk format: what is written is v2 (BLAKE3), and v1 entries (SHA-256),
written by earlier versions, still decode, so an upgraded disk tier stays warm."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import save as st_save

from vllm_kvflow.store import ChunkKV
from vllm_kvflow.store.chunk_format import FORMAT, CorruptEntry, decode, encode, parse_header

ID = "model-x|float32|layout|rank0"


def _entry() -> ChunkKV:
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 3, 2, 4, generator=g)
    return ChunkKV((5, 6, 7), kv, kv * 2, local_start=1)


def _v1_blob(key: str, entry: ChunkKV) -> bytes:
    """An entry as version 1 wrote it, the checksum spelled out here with hashlib."""
    tensors = {"keys": entry.keys, "values": entry.values,
               "token_ids": torch.tensor(entry.token_ids, dtype=torch.int64)}
    fields = {"format": "kvflow-chunk-v1", "key": key, "identity": ID,
              "local_start": str(entry.local_start)}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return st_save(tensors, metadata={**fields, "checksum": h.hexdigest()})


def _same(a: ChunkKV, b: ChunkKV) -> bool:
    return (a.token_ids == b.token_ids and a.local_start == b.local_start
            and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values))


def test_written_entries_are_the_current_format_and_round_trip():
    blob = encode("k", ID, _entry())
    meta, size = parse_header(blob)
    assert meta["format"] == FORMAT == "kvflow-chunk-v2" and size == len(blob)
    assert _same(decode(blob, "k", ID), _entry())


def test_version_1_entries_still_decode():
    assert _same(decode(_v1_blob("k", _entry()), "k", ID), _entry())


@pytest.mark.parametrize("make", [lambda: encode("k", ID, _entry()),
                                  lambda: _v1_blob("k", _entry())], ids=["v2", "v1"])
def test_a_flipped_tensor_byte_fails_either_checksum(make):
    data = bytearray(make())
    data[-30] ^= 0x01  # inside the keys/values bytes
    with pytest.raises(CorruptEntry, match="checksum"):
        decode(bytes(data), "k", ID)


def test_a_format_label_swapped_to_the_other_version_fails_the_checksum():
    blob = encode("k", ID, _entry())
    swapped = blob.replace(b"kvflow-chunk-v2", b"kvflow-chunk-v1")  # same length
    with pytest.raises(CorruptEntry, match="checksum"):
        decode(swapped, "k", ID)


def test_an_unknown_format_is_corrupt():
    blob = encode("k", ID, _entry()).replace(b"kvflow-chunk-v2", b"kvflow-chunk-v9")
    with pytest.raises(CorruptEntry, match="format"):
        decode(blob, "k", ID)

"""What the store keeps and how it names it: the chunk entry (ChunkKV) and the chunk key.

Its own module so the store's tiers and the store that holds them both import it from
here, not from each other; and so code outside the store (the prefix-cache patch hashes
token ids with the same bytes) need not import the store to use the helpers.
"""
from __future__ import annotations

import hashlib
import struct
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


def chunk_key(model_id: str, namespace: str, sink_ids, token_ids) -> str:
    """Content hash of a chunk; position-independent by construction. `namespace` is
    what tenant_namespace() built; the fields are length-prefixed, so no namespace can
    spell another's fields."""
    h = hashlib.sha256()
    hash_fields(h, model_id, namespace, int64_bytes(sink_ids), int64_bytes(token_ids))
    return h.hexdigest()


def tenant_namespace(namespace: str, salt: str | None) -> str:
    """One string naming a (namespace, cache salt) pair, different for different pairs
    whatever characters either holds: each field is prefixed by its length. An empty
    salt is no salt, as in vLLM's prefix cache."""
    fields = (namespace, salt) if salt else (namespace,)
    return "".join(f"{len(f)}:{f}" for f in fields)


def hash_fields(h, *fields: str | bytes | None) -> None:
    """Feed fields to hash h so that different tuples of fields never feed it the same
    bytes: each is tagged (absent, text, bytes) and length-prefixed. Text encodes as
    UTF-8, lone surrogates included (surrogatepass), so every string has an identity."""
    for field in fields:
        if field is None:
            h.update(b"N")
            continue
        tag, data = (b"S", field.encode("utf-8", "surrogatepass")) if isinstance(field, str) \
            else (b"B", bytes(field))
        h.update(tag + len(data).to_bytes(8, "little"))
        h.update(data)


def int64_bytes(ids) -> bytes:
    """Little-endian int64 bytes of the ids (struct is ~3x faster than numpy for the
    ~100-token lists a request looks up hundreds of; same bytes either way)."""
    if isinstance(ids, (list, tuple)):
        return struct.pack(f"<{len(ids)}q", *ids)
    return np.asarray(ids, dtype="<i8").tobytes()


@dataclass
class ChunkKV:
    """KV of one chunk computed in isolation behind the sink prefix.

    keys/values: [num_layers, T, num_kv_heads, head_dim]; keys are post-RoPE at the
    local positions local_start .. local_start + T - 1.
    """

    token_ids: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    local_start: int
    # A CUDA event after the work that computed keys and values (mark_computed).
    ready: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + (
            self.values.numel() * self.values.element_size()
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def mark_computed(self) -> "ChunkKV":
        """Note where the current stream stands, for readers on threads of their own
        (the disk and remote writers): their streams are not ordered after the one that
        computed this entry, which may be the worker's blend stream
        (blend/side_stream.py)."""
        if self.keys.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()
        return self

    def wait_computed(self) -> None:
        """Block this thread until the work noted by mark_computed is done."""
        if self.ready is not None:
            self.ready.synchronize()

    def to(self, device) -> "ChunkKV":
        """This entry with tensors on device (itself if None or already there)."""
        if device is None or self.keys.device == torch.device(device):
            return self
        return ChunkKV(self.token_ids, _moved(self.keys, device), _moved(self.values, device),
                       self.local_start)


def _moved(t: torch.Tensor, device) -> torch.Tensor:
    """t on device; GPU -> host lands in pinned memory, so loading it back is an
    asynchronous DMA at full PCIe speed instead of a pageable, synchronous copy."""
    if t.is_cuda and torch.device(device).type == "cpu":
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return pinned.copy_(t)
    return t.to(device)

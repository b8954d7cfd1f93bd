"""What the store keeps and how it names it: the chunk entry (ChunkKV) and the chunk key.

Its own module so the store's tiers and the store that holds them both import it from
here, not from each other; and so code outside the store (the prefix-cache patch hashes
token ids with the same bytes) need not import the store to use the helpers.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch


def chunk_key(model_id: str, namespace: str, sink_ids, token_ids) -> str:
    """Content hash of a chunk; position-independent by construction."""
    h = hashlib.sha256()
    for part in (model_id, namespace):
        h.update(part.encode())
        h.update(b"\0")
    h.update(int64_bytes(sink_ids))
    h.update(b"\0")
    h.update(int64_bytes(token_ids))
    return h.hexdigest()


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

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + (
            self.values.numel() * self.values.element_size()
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

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

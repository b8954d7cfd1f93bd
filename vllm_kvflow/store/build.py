"""The worker's chunk store, from the settings: memory tiers, then the optional disk
and remote tiers."""
from __future__ import annotations

import logging

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.store.chunk_store import ChunkStore
from vllm_kvflow.store.tiers import MemoryTier

logger = logging.getLogger("vllm_kvflow.store")


def build_store(config: KVFlowConfig, device: str, identity: str) -> ChunkStore:
    """device: the worker's device ("cpu", "cuda:0", ...); identity: model, dtype, KV
    layout and rank, written into disk files and remote keys and values so another
    model's KV is never loaded."""
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
    remote = None
    if config.store_remote_url is not None:
        from vllm_kvflow.store.remote import RemoteTier  # needs redis; only when asked for

        remote = RemoteTier(config.store_remote_url, identity, config.store_remote_bytes,
                            connect_timeout_s=config.store_remote_connect_timeout_s,
                            timeout_s=config.store_remote_timeout_s,
                            queue_bytes=int(config.store_remote_queue_mb * (1 << 20)))
    return ChunkStore(tiers=tiers, disk=disk, remote=remote)

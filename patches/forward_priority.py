"""vLLM's own GPU work on a high-priority CUDA stream (blend_stream "background").

With blend work on a stream of its own (blend/side_stream.py) the forward no longer
waits for it, but the two share the GPU at equal priority: the block scheduler
interleaves their kernels, and a small request's step ran at about half speed during a
burst of misses. CUDA offers no priority below the default one, which is where vLLM
queues its work (the thread's current stream), so the only way to put the blend work
behind the forward is to lift vLLM's: right after the worker has set up its device,
the thread's current stream becomes a stream of the highest priority. Everything the
worker queues from then on (forwards and their CUDA graphs, sampling, the output
copies, which wait on the stream current when the runner first reads it) goes there,
and the blend stream keeps the default priority. A pending forward's thread blocks
then start ahead of any blend kernel's; blend kernels already running finish their
blocks.

vLLM 0.26 GPU workers (`Worker.init_device` in vllm.v1.worker.gpu_worker); the worker
thread that runs init_device is the one that runs every step (uniprocess and
multiprocess executors alike). One tensor-parallel rank only, like the side stream.
"""
from __future__ import annotations

import functools
import logging

from vllm_kvflow.patches.import_hooks import when_imported

logger = logging.getLogger("vllm_kvflow")

WORKER_MODULE = "vllm.v1.worker.gpu_worker"
HIGHEST = -(1 << 10)  # torch maps a priority beyond the device's range to its end


def wanted(vllm_config) -> bool:
    """Whether this engine runs its blend work in the background: the kvflow connector
    with blend_stream "background", where the worker gives blend work a stream of its
    own (CUDA, one rank). Settings the connector will refuse count as not."""
    from vllm_kvflow.config import KVFlowConfig
    from vllm_kvflow.connector.worker import separate_blend_stream
    from vllm_kvflow.plugin import connector_settings

    extra = connector_settings(vllm_config)
    if extra is None or extra.get("blend_stream") != "background":
        return False
    try:
        config = KVFlowConfig.from_extra_config(extra)
    except (TypeError, ValueError):
        return False  # the connector reports them when it starts
    return separate_blend_stream(config, vllm_config)


def lift_current_stream(device):
    """Make a highest-priority stream this thread's current one on device; returns it."""
    import torch

    stream = torch.cuda.Stream(device=device, priority=HIGHEST)
    torch.cuda.synchronize(device)  # whatever init_device queued is done before the switch
    torch.cuda.set_stream(stream)
    return stream


def _wrap_init_device(module) -> None:
    cls = getattr(module, "Worker", None)
    original = getattr(cls, "init_device", None)
    if original is None or getattr(original, "_kvflow_wrapped", False):
        return

    @functools.wraps(original)
    def init_device(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if wanted(self.vllm_config):
            stream = lift_current_stream(self.device)
            # The V2 runner caches the stream current at its first read; drop a read
            # made before the switch, if any.
            runner = getattr(self, "model_runner", None)
            if runner is not None:
                runner.__dict__.pop("main_stream", None)
            logger.info("kvflow: vLLM's work on a stream of priority %d, blend work "
                        "behind it", stream.priority)
        return out

    init_device._kvflow_wrapped = True
    cls.init_device = init_device


def install() -> None:
    when_imported(WORKER_MODULE, _wrap_init_device)

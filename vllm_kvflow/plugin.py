"""The `vllm.general_plugins` entry point. vLLM calls it in every process (API server,
engine core, each worker), possibly more than once: everything here is idempotent."""
from __future__ import annotations

import faulthandler
import logging
import signal
import threading

CONNECTOR_NAME = "KVFlowConnector"
CONNECTOR_MODULE = "vllm_kvflow.connector.connector"
_stack_dumps_set = False  # stack_dumps_on_sigusr1 ran in this process


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)

    log_through_vllm()
    stack_dumps_on_sigusr1()

    from vllm_kvflow.patches import model_hook

    model_hook.install()

    from vllm_kvflow.patches import declaration_guard, stream_stats

    stream_stats.install()  # patches the API server's stream generators on their import
    declaration_guard.install()  # and its entry points: 400 for untransportable declarations

    from vllm_kvflow.patches import forward_priority, vision_attention

    forward_priority.install()  # vLLM's stream above the blend stream (blend_stream background)

    vision_attention.install()  # HilbertA in vision encoders built with vision_attention on


def connector_settings(vllm_config) -> dict | None:
    """The kvflow connector's kv_connector_extra_config in a vLLM config ({} when unset),
    or None when the engine has no kvflow connector: for patches that act before the
    connector exists (a worker's device set-up, a vision encoder's construction)."""
    kvt = getattr(vllm_config, "kv_transfer_config", None) if vllm_config is not None else None
    if kvt is None or not (getattr(kvt, "kv_connector", None) == CONNECTOR_NAME
                           or getattr(kvt, "kv_connector_module_path", None) == CONNECTOR_MODULE):
        return None
    return getattr(kvt, "kv_connector_extra_config", None) or {}


def stack_dumps_on_sigusr1() -> bool:
    """`kill -USR1 PID` then prints every thread's Python stack to that process's stderr
    (a server's log) and the process goes on: how a stalled engine is looked into
    without stopping it (benchmarks/gpu/run_engine_gpu.sh does it when a load run
    times out). Only from the main thread (where signal handlers are set) and where
    no Python handler has SIGUSR1; whether this call set it (once per process:
    faulthandler's handler is invisible to signal.getsignal)."""
    global _stack_dumps_set
    if _stack_dumps_set or not hasattr(signal, "SIGUSR1") \
            or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL:
        return False
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _stack_dumps_set = True
    return True


def log_through_vllm() -> None:
    """vLLM configures handlers for its own "vllm" logger only, so in a server's
    processes the "vllm_kvflow" logger had none and its INFO lines (log_stats) were
    dropped. Where nothing else handles them (no root handler: a script or a test
    runner may have one), they go out through vLLM's handlers, at vLLM's level."""
    ours, theirs = logging.getLogger("vllm_kvflow"), logging.getLogger("vllm")
    if ours.handlers or logging.getLogger().handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(theirs.level)

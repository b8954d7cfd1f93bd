"""Keep a reference to the model each worker process loads.

vLLM offers no hook from a KV connector to the model, and the layer-wise recompute needs
the model's own layers. The plugin wraps the model runners' `load_model` (in every
process, before any runner exists); the wrapped method records the loaded module here.
The runner classes and the signature of `load_model` differ between vLLM versions
(0.26: GPU v1/v2 runners; 0.32 adds the CPU runner's own `load_model` and a keyword-only
`model=None` on GPU runners), so the wrapper takes *args/**kwargs.
"""
from __future__ import annotations

import functools
import importlib
import logging

logger = logging.getLogger("vllm_kvflow")

RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
)

_state = {"model": None}


def current_model():
    model = _state["model"]
    if model is None:
        raise RuntimeError(
            "kvflow: no model recorded in this process; the vllm_kvflow plugin must be "
            "loaded (check VLLM_PLUGINS allows 'kvflow')"
        )
    return model


def record_model(model) -> None:
    _state["model"] = model


def _unwrap(runner):
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    # CUDA-graph / compile wrappers keep the module under .module or .runnable.
    for attr in ("module", "runnable"):
        while hasattr(model, attr) and not hasattr(model, "model"):
            model = getattr(model, attr)
    return model


def _wrap(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_kvflow_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        record_model(_unwrap(self))
        return out

    load_model._kvflow_wrapped = True
    cls.load_model = load_model


def install() -> None:
    """Idempotent; runner modules that do not exist in this vLLM are skipped."""
    for module_name, class_name in RUNNERS:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - a platform without this runner
            logger.debug("kvflow: runner %s not available: %s", module_name, e)
            continue
        cls = getattr(module, class_name, None)
        if cls is not None:
            _wrap(cls)

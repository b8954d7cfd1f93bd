"""vllm_kvflow: reuse the KV of retrieved chunks in vLLM, recomputing only the tokens the
question attends to most (InfoFlow KV), plus HilbertA sparse attention for image tokens.

Public API: `transfer_config(...)` for `LLM(..., kv_transfer_config=...)`, the RAG
prompt builder `build_rag_prompt`, and `__version__`. The core (store, blend, kernels)
imports without vLLM.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The Triton kernels and the vLLM-version shims live in top-level folders of the
# repository (csrc_triton/, patches/) and are the subpackages vllm_kvflow.kernels and
# vllm_kvflow.patches. A built wheel holds them in place (setup.py's package_dir). A
# source checkout (the editable install, a plain PYTHONPATH, the GPU machine) mounts
# them here, from the checkout this very file belongs to, so two checkouts side by
# side never mix their kernels.
SUBPACKAGE_FOLDERS = {"kernels": "csrc_triton", "patches": "patches"}


def _mount_top_level_folders() -> None:
    here = Path(__file__).resolve().parent
    for sub, folder in SUBPACKAGE_FOLDERS.items():
        name = f"{__name__}.{sub}"
        source = here.parent / folder
        if name in sys.modules or (here / sub).is_dir() or not (source / "__init__.py").is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            name, source / "__init__.py", submodule_search_locations=[str(source)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        globals()[sub] = module


_mount_top_level_folders()


def transfer_config(**settings: Any) -> dict[str, Any]:
    """The `kv_transfer_config` dict enabling kvflow; settings as in KVFlowConfig.

    Example: LLM(model, kv_transfer_config=vllm_kvflow.transfer_config(method="infoflow"))
    """
    from vllm_kvflow.config import KVFlowConfig

    config = KVFlowConfig.from_extra_config(settings)  # validates names and values
    return {
        "kv_connector": "KVFlowConnector",
        "kv_role": "kv_both",
        # A failed load recomputes the request's blocks (full prefill) instead of failing it.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": config.to_extra_config(),
    }


def build_rag_prompt(*args, **kwargs):
    from vllm_kvflow.rag import build_rag_prompt as build

    return build(*args, **kwargs)


__all__ = ["__version__", "transfer_config", "build_rag_prompt"]

"""vllm_kvflow: reuse the KV of retrieved chunks in vLLM, recomputing only the tokens the
question attends to most (InfoFlow KV), plus HilbertA sparse attention for image tokens.

Public API: `transfer_config(...)` for `LLM(..., kv_transfer_config=...)`, the RAG
prompt builder `build_rag_prompt`, and `__version__`. The core (store, blend, kernels)
imports without vLLM.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


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

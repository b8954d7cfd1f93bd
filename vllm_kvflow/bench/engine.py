"""Shared by the demo and the benchmarks: build an engine, time one request's TTFT."""
from __future__ import annotations

import os
import platform
import time
from typing import Any


def default_dtype() -> str:
    """float32 on CPU: without AVX512-BF16/AMX, vLLM-CPU's bf16 linear layers fall back to
    a slow path (about 6x slower prefill on the 2-core machine); the model's own on GPU."""
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def make_llm(model: str | None = None, *, connector: bool = True, prefix_caching: bool = False,
             max_model_len: int = 8192, dtype: str | None = None, load_format: str = "auto",
             **kvflow_settings: Any):
    """An LLM on the CPU or GPU platform; kvflow settings go to transfer_config()."""
    dtype = dtype or default_dtype()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    import vllm_kvflow
    from vllm_kvflow.model import default_model_path

    kwargs: dict[str, Any] = dict(
        dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
        load_format=load_format, seed=0,
    )
    import torch

    if not torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=0.3, distributed_executor_backend="uni")
    if connector:
        kwargs["kv_transfer_config"] = vllm_kvflow.transfer_config(**kvflow_settings)
    return LLM(model or str(default_model_path()), **kwargs)


def time_first_token(llm, prompt: dict, kv_params: dict | None) -> tuple[float, Any]:
    """Wall time of a one-token generation (= TTFT for a lone request), and its output."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=1,
                        extra_args={"kv_transfer_params": kv_params} if kv_params else None)
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    return time.perf_counter() - t0, out


def environment() -> dict[str, Any]:
    import torch
    import vllm

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}")
    return {"card": card, "vllm": vllm.__version__, "torch": torch.__version__}

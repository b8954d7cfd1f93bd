"""Direct CUDA kernels for the executor's eager layer passes (vLLM 0.26 on GPU).

vLLM runs its models compiled (torch.compile, CUDA graphs), so its custom ops are built
for that: called eagerly, RMSNorm goes through the IR-op dispatcher to a torch-native
implementation, about 300 us of host time per call (torch.profiler on an H200, vLLM
0.26), and SiluAndMul / rotary embedding take their native paths too. The executor runs
the decoder layers eagerly, so a 32-layer pass over a few tokens cost 60-80 ms of host
time. For the duration of a pass this sends RMSNorm straight to vLLM's CUDA kernels
(`_C.rms_norm`, `_C.fused_add_rms_norm`, the ones its own dispatcher picks on CUDA) and
the other custom ops of the layers to their `forward_cuda`. Everything is restored after
the pass; CPU engines are left alone.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _has_c_norms() -> bool:
    try:
        return bool(torch.ops._C.rms_norm) and bool(torch.ops._C.fused_add_rms_norm)
    except (AttributeError, RuntimeError):
        return False


def _direct_norm(module: nn.Module, original):
    weight, eps = module.weight.data, module.variance_epsilon

    def forward(x, residual=None):
        if x.dtype != weight.dtype or not x.is_contiguous():
            return original(x, residual)
        if residual is None:
            out = torch.empty_like(x)
            torch.ops._C.rms_norm(out, x, weight, eps)
            return out
        if not residual.is_contiguous() or residual.dtype != x.dtype:
            return original(x, residual)
        torch.ops._C.fused_add_rms_norm(x, residual, weight, eps)  # in place, both
        return x, residual

    return forward


def _plan(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, fast forward) for every custom op of the model that has one."""
    try:
        from vllm.model_executor.custom_op import CustomOp
        from vllm.model_executor.layers.layernorm import RMSNorm
    except ImportError:
        return []
    c_norms = _has_c_norms()
    plan = []
    for m in model.modules():
        if isinstance(m, RMSNorm):
            plain = (getattr(m, "has_weight", True) and getattr(m, "variance_size_override", None) is None)
            if c_norms and plain:
                plan.append((m, _direct_norm(m, m.forward)))
        elif isinstance(m, CustomOp):
            name = type(m).__name__
            if name == "SiluAndMul" or name.endswith("RotaryEmbedding"):
                plan.append((m, m.forward_cuda))
    return plan


_PLANS: dict[int, list] = {}


@contextlib.contextmanager
def fast_eager_ops(model: nn.Module | None, device: torch.device):
    if model is None or device.type != "cuda":
        yield
        return
    plan = _PLANS.get(id(model))
    if plan is None:
        plan = _PLANS[id(model)] = _plan(model)
    for module, fast in plan:
        module.forward = fast
    try:
        yield
    finally:
        for module, _ in plan:
            del module.forward  # back to the class's forward

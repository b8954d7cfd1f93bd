"""vLLM 0.26's Qwen2.5-VL vision encoder alone, with random weights, and images made from
code: for the GPU benchmark of HilbertA in the encoder and its GPU tests (no engine, no
hub, no weights).

What vLLM's model loader would do, reduced to the encoder (vLLM 0.26 sources):
  * the model is built under set_current_vllm_config (custom ops and layers read it),
    with the model dtype as torch's default dtype and the target device as default device;
    its parallel layers need the tensor-parallel group, so a one-process group is set up
    (init_distributed_environment + initialize_model_parallel) unless one exists;
  * Qwen2_5_VisionTransformer(vision_config, norm_eps, quant_config, prefix);
  * weights: random (normal, std `weight_std`; norm weights 1), then each layer's
    quant_method.process_weights_after_loading and MMEncoderAttention's, as
    model_loader.utils.process_weights_after_loading does;
  * the worker's IR-op priorities and torch wrapping (kernel_config.ir_op_priority.
    set_default() and vllm.ir.set_default_torch_wrap(compilation_config.
    ir_enable_torch_wrap), as worker_base does), so RMSNorm picks the kernels an engine
    would. VllmConfig() is an engine's default (VLLM_COMPILE, inductor, custom ops
    "none"): the encoder's blocks stay eager (compile_mm_encoder is off), its norms run
    vLLM IR's "native" provider and its SiluAndMul is torch-compiled on first call, as
    in a default engine.
`describe` says what vLLM chose (attention backend, FlashAttention version, compile
mode, IR priorities), for the GPU run's log.
Images: gradients, noise and shapes at any size, resized with transformers' smart_resize
(the rule vLLM's Qwen2-VL processor info uses), CLIP-normalised and cut into the
processor's patch layout: [grid_t * grid_h * grid_w, 3 * 2 * 14 * 14], each 2 x 2 merge
unit's patches contiguous.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from pathlib import Path

import torch

__all__ = ["build_qwen25_vision_encoder", "config_summary", "describe", "encoder_context",
           "image_patches", "make_image", "patchify", "teardown_parallel_state"]

logger = logging.getLogger("vllm_kvflow")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hf_config(config_path: str | Path):
    """The model's transformers config from a config.json file or a model directory."""
    from transformers import AutoConfig

    path = Path(config_path)
    if path.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="kvflow_vlm_cfg_"))
        (tmp / "config.json").write_text(path.read_text())
        path = tmp
    return AutoConfig.from_pretrained(str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_parallel_state(device: torch.device) -> None:
    """A one-process tensor/pipeline-parallel group (needs the current vLLM config)."""
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return
    # vLLM's world group, not only torch's process group: initialize_model_parallel reads
    # it (a process where torch.distributed is up but vLLM's world is not still needs it;
    # init_distributed_environment then skips init_process_group).
    if getattr(ps, "_WORLD", None) is None:
        local_rank = device.index if device.type == "cuda" and device.index is not None else 0
        backend = "nccl" if device.type == "cuda" else "gloo"
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=local_rank,
                                        backend=backend,
                                        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    ps.initialize_model_parallel(1, 1)


def teardown_parallel_state() -> None:
    """Undo _ensure_parallel_state (vLLM's groups, then torch's process group), so the
    process does not end with NCCL's "destroy_process_group() was not called" after the
    last lines a caller reads. Errors are logged: this runs at the end, after results."""
    try:
        from vllm.distributed import parallel_state as ps

        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()
    except Exception as e:  # noqa: BLE001 - cleanup only
        logger.warning("kvflow: tearing down the parallel state failed (%s: %s)", type(e).__name__, e)


def _set_ir_defaults(vllm_config) -> None:
    """What worker_base does at start: the IR ops' provider priorities and torch wrapping.
    Without it, vLLM IR warns and runs "native" (the same provider as a default engine's
    on CUDA); a failure is logged, not raised (stock and HilbertA then share it)."""
    try:
        vllm_config.kernel_config.ir_op_priority.set_default()
        import vllm.ir

        vllm.ir.set_default_torch_wrap(vllm_config.compilation_config.ir_enable_torch_wrap)
    except Exception as e:  # noqa: BLE001 - both attention variants then share the defaults
        logger.warning("kvflow: IR-op priorities not set (%s: %s); the encoder's norms "
                       "use vLLM's default providers", type(e).__name__, e)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def _random_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    gens: dict = {}  # one generator per device: the weights are drawn where they live
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or "ln_q" in name):
            p.fill_(1.0)
            continue
        gen = gens.get(p.device)
        if gen is None:
            gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std)


def build_qwen25_vision_encoder(config_path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                                device: str = "cuda", seed: int = 0, weight_std: float = 0.02):
    """(encoder, vllm_config, hf_config): vLLM 0.26's Qwen2_5_VisionTransformer built from
    config_path (a config.json or a model directory) with random weights, on `device`.
    Run it inside `with set_current_vllm_config(vllm_config):` (encoder_context)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    hf = _hf_config(config_path)
    if getattr(hf, "model_type", None) != "qwen2_5_vl":
        raise ValueError(f"{config_path}: model_type {getattr(hf, 'model_type', None)!r}, "
                         "expected 'qwen2_5_vl'")
    vllm_config = VllmConfig()
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    with set_current_vllm_config(vllm_config):
        _ensure_parallel_state(device)
        _set_ir_defaults(vllm_config)
        with _default_dtype(dtype), torch.device(device):
            # As Qwen2_5_VLForConditionalGeneration builds `visual` (the same getattr: with
            # transformers 5 the top-level config has no rms_norm_eps, so 1e-6 there too).
            encoder = Qwen2_5_VisionTransformer(
                vision_config=hf.vision_config, norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
                quant_config=None, prefix="visual")
        _random_weights(encoder, weight_std, seed)
        _process_weights_after_loading(encoder, dtype)
    return encoder.eval(), vllm_config, hf


def _process_weights_after_loading(encoder, dtype: torch.dtype) -> None:
    """model_loader.utils.process_weights_after_loading, reduced to the encoder: each
    quant method's (UnquantizedLinearMethod: nothing on CUDA), then the attention ops'."""
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    for module in encoder.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(module)
    for module in encoder.modules():
        if isinstance(module, MMEncoderAttention) and hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading(dtype)


def describe(encoder, vllm_config) -> dict:
    """What vLLM chose for this encoder, for the log: its attention backend (and the
    full-attention ops' own, with the FlashAttention version), the compilation settings
    the custom ops dispatched on, the IR ops' providers, the weights' dtype and device,
    and whether a block is compiled or runs FP8 attention (HilbertA refuses both)."""
    out: dict = {"encoder": type(encoder).__name__,
                 "encoder_attn_backend": str(getattr(encoder, "attn_backend", None))}
    full = sorted(int(i) for i in getattr(encoder, "fullatt_block_indexes", []))
    ops = {i: encoder.blocks[i].attn.attn for i in full}
    out["full_attention_ops"] = sorted({
        f"{type(op).__name__}(backend={getattr(op, 'attn_backend', None)}, "
        f"fa_version={getattr(op, '_fa_version', None)}, fp8={getattr(op, 'fp8_enabled', None)}, "
        f"scale={getattr(op, 'scale', None)})" for op in ops.values()})
    out["blocks_compiled"] = [i for i, b in enumerate(encoder.blocks)
                              if getattr(b, "do_not_compile", True) is False]
    cc = getattr(vllm_config, "compilation_config", None)
    out["compilation"] = {k: str(getattr(cc, k, None)) for k in (
        "mode", "backend", "custom_ops", "compile_mm_encoder", "cudagraph_mm_encoder",
        "ir_enable_torch_wrap")}
    try:
        import vllm.ir

        out["ir_priority"] = {name: getattr(vllm.ir.ops, name).get_priority()
                              for name in ("rms_norm", "fused_add_rms_norm")
                              if hasattr(vllm.ir.ops, name)}
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        out["ir_priority"] = f"{type(e).__name__}: {e}"
    params = list(encoder.parameters())
    out["param_dtypes"] = sorted({str(p.dtype) for p in params})
    out["param_devices"] = sorted({str(p.device) for p in params})
    out["params"] = sum(p.numel() for p in params)
    return out


def encoder_context(vllm_config):
    """The context the encoder's forward runs in (custom ops read the current config)."""
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(vllm_config)


# ----------------------------------------------------------------------------- images

def make_image(kind: str, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] image made from code: "gradient" (smooth colour ramps),
    "noise" (uniform per pixel), "shapes" (discs and boxes on a ramp)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    if kind == "gradient":
        img = torch.stack([x, y, 0.5 * (1 - x) + 0.5 * y])
    elif kind == "noise":
        img = torch.rand(3, height, width, generator=gen)
    elif kind == "shapes":
        img = torch.stack([0.3 * x, 0.3 * y, 0.3 * (x + y) / 2]).clone()
        for _ in range(12):
            cy, cx, r = torch.rand(3, generator=gen).tolist()
            colour = torch.rand(3, 1, generator=gen)
            if torch.rand(1, generator=gen).item() < 0.5:
                inside = (y - cy) ** 2 + (x - cx) ** 2 < (0.05 + 0.15 * r) ** 2
            else:
                inside = ((y - cy).abs() < 0.04 + 0.1 * r) & ((x - cx).abs() < 0.04 + 0.2 * r)
            img = torch.where(inside[None], colour[..., None].expand(3, height, width), img)
    else:
        raise ValueError(f"image kind must be gradient, noise or shapes, got {kind!r}")
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def patchify(x: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """[grid_h * grid_w, 3 * temporal * patch^2] patches of a normalised [3, H, W] image
    (H, W multiples of patch * merge): merge units row-major, each unit's patches
    row-major, each patch's values as (channel, frame, row, col), the frame repeated
    `temporal` times (a still image)."""
    c, rh, rw = x.shape
    if rh % (patch * merge) or rw % (patch * merge):
        raise ValueError(f"image {rh}x{rw} is not a multiple of {patch * merge} on each side")
    gh, gw = rh // patch, rw // patch
    frames = x[None].expand(temporal, c, rh, rw)
    # [temporal, C, gh/m, m, p, gw/m, m, p] -> (gh/m, gw/m, m, m, C, temporal, p, p)
    t = frames.reshape(temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    return t.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, c * temporal * patch * patch).contiguous()


# Qwen2.5-VL's processor allows up to 16384 merge units (12.8 M pixels) when asked;
# its default of 1280 units would shrink every image above ~1000^2 to 70 x 70 patches,
# and a 2048^2 image must stay 146 x 146 to be measured as one.
MAX_PIXELS = 28 * 28 * 16384


def image_patches(image: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2,
                  min_pixels: int = 56 * 56, max_pixels: int = MAX_PIXELS):
    """(pixel_values [N, 3 * temporal * patch^2] float32, grid_thw [1, 3] int64) of a uint8
    [3, H, W] image: resized by transformers' smart_resize, CLIP-normalised, patchify."""
    smart_resize = _smart_resize()
    _, h, w = image.shape
    rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    x = torch.nn.functional.interpolate(image[None].float() / 255, size=(rh, rw), mode="bicubic",
                                        align_corners=False)[0]
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return patchify(x, patch, merge, temporal), torch.tensor([[1, rh // patch, rw // patch]])


def _smart_resize():
    """transformers' smart_resize, from where vLLM 0.26's Qwen2-VL imports it (that module
    needs torchvision in transformers 5), else its torchvision-free twin (the PIL image
    processor's, transformers >= 5.x), else the same rule written out here."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        return smart_resize
    except ImportError:
        pass
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize
    except ImportError:
        return _smart_resize_rule


def _smart_resize_rule(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                       max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's smart_resize (transformers): sides rounded to multiples of factor, the
    area brought into [min_pixels, max_pixels] keeping the aspect ratio."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def config_summary(hf) -> dict:
    """The vision shapes that matter, for a benchmark's JSON."""
    v = hf.vision_config
    return {k: getattr(v, k, None) for k in (
        "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
        "spatial_merge_size", "window_size", "fullatt_block_indexes", "out_hidden_size")}

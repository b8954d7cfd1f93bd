"""HilbertA in vLLM's Qwen2.5-VL and Qwen3-VL vision encoders (`vision_attention: "hilberta"`).

Written against vLLM 0.26 (model_executor/models/qwen2_5_vl.py, qwen3_vl.py):
  * Qwen2_5_VisionTransformer(vision_config, norm_eps, quant_config, prefix) holds
    `blocks`; block i's attention op is `blocks[i].attn.attn`, an MMEncoderAttention
    called as attn(query=, key=, value=, cu_seqlens=, max_seqlen=, sequence_lengths=) with
    [1, S, H, D] tensors, returning [1, S, H, D]; the full-attention blocks are
    `fullatt_block_indexes`; `get_window_index_thw(t, h, w)` (patches) gives an item's
    merge units in the blocks' sequence order; `forward(x, grid_thw, *, encoder_metadata)`.
  * Qwen3_VisionTransformer: the same blocks and op, every block full attention, units in
    row-major order (no window reordering).
When the setting is on, each encoder built while it is active gets, in its full-attention
blocks, a HilbertEncoderAttention in place of the op (vision/encoder_attention.py), and an
instance-level forward that tells them the frames of the call (grid_thw). A forward
without grid_thw (vLLM's encoder CUDA graphs replay with metadata only) runs the stock op,
with a warning. A torch-compiled encoder (compile_mm_encoder) is refused: the op reads
its frames from Python state that a compiled graph would freeze; so is FP8 encoder
attention (the kernel takes 16- or 32-bit q, k, v).

The setting comes from kv_connector_extra_config of the engine's kvflow connector (read
through vLLM's current config while the model is built). `enable` / `disable` switch an
encoder by hand (the GPU benchmark times both on one set of weights).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vllm_kvflow.patches.import_hooks import when_imported
from vllm_kvflow.vision.encoder_attention import (EncoderContext, HilbertASettings,
                                                  HilbertEncoderAttention)

logger = logging.getLogger("vllm_kvflow")

__all__ = ["FAMILIES", "EncoderFamily", "configured_mode", "disable", "enable", "install"]


@dataclass(frozen=True)
class EncoderFamily:
    """Where one vLLM vision encoder class keeps what HilbertA needs."""

    module: str
    cls: str
    full_blocks: Callable[[Any], list[int]]  # indexes of its full-attention blocks
    window_units: Callable[[Any], int]  # its window side in merge units (0: no windows)
    unit_order: Callable[[Any], Callable | None]  # (t, h, w) -> item's units in order


def _qwen25_unit_order(encoder):
    def order(t, h, w):
        index, _ = encoder.get_window_index_thw(t, h, w)
        return np.asarray(index.cpu() if hasattr(index, "cpu") else index, dtype=np.int64)

    return order


def _row_major(t, h, w, merge):
    return np.arange(t * (h // merge) * (w // merge), dtype=np.int64)


FAMILIES = (
    EncoderFamily(
        "vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VisionTransformer",
        full_blocks=lambda enc: sorted(int(i) for i in enc.fullatt_block_indexes),
        window_units=lambda enc: enc.window_size // enc.spatial_merge_size // enc.patch_size,
        unit_order=_qwen25_unit_order),
    EncoderFamily(
        "vllm.model_executor.models.qwen3_vl", "Qwen3_VisionTransformer",
        full_blocks=lambda enc: list(range(len(enc.blocks))),
        window_units=lambda enc: 0,
        unit_order=lambda enc: functools.partial(_row_major, merge=enc.spatial_merge_size)),
)


def _family_of(encoder) -> EncoderFamily:
    for cls in type(encoder).__mro__:
        for family in FAMILIES:
            if cls.__name__ == family.cls:
                return family
    raise TypeError(f"HilbertA has no recipe for vision encoder {type(encoder).__name__}; "
                    f"known: {[f.cls for f in FAMILIES]}")


def enable(encoder, settings: HilbertASettings | None = None, *, kernel: str | None = None,
           family: EncoderFamily | None = None) -> EncoderContext:
    """Put HilbertA into the encoder's full-attention blocks (idempotent: an encoder that
    has it keeps its context). kernel: vision/encoder_attention.KERNELS name (None: Triton
    on CUDA, SDPA elsewhere). Returns the context its blocks share."""
    ctx = getattr(encoder, "_kvflow_hilberta", None)
    if ctx is not None:
        if (settings is not None and settings != ctx.settings) or (kernel is not None and kernel != ctx.kernel):
            # A benchmark sweeping settings must disable first, or it measures the old ones.
            logger.warning("kvflow: HilbertA already on in %s with %s, kernel %s; keeping them "
                           "(asked: %s, kernel %s; disable first to change)", type(encoder).__name__,
                           ctx.settings.identity(), ctx.kernel,
                           settings.identity() if settings else None, kernel)
        return ctx
    family = family or _family_of(encoder)
    compiled = [i for i, b in enumerate(encoder.blocks) if getattr(b, "do_not_compile", True) is False]
    if compiled:
        raise ValueError("vision_attention 'hilberta' runs the vision encoder eagerly; turn off "
                         "compile_mm_encoder in the compilation config (blocks "
                         f"{compiled[:4]} are torch-compiled)")
    blocks = family.full_blocks(encoder)
    if any(getattr(encoder.blocks[i].attn.attn, "fp8_enabled", False) for i in blocks):
        raise ValueError("vision_attention 'hilberta' takes the encoder's bf16/fp16 q, k, v; "
                         "turn off mm_encoder_attn_dtype 'fp8'")
    merge = int(encoder.spatial_merge_size)
    ctx = EncoderContext(merge, family.window_units(encoder), settings or HilbertASettings(),
                         unit_order=family.unit_order(encoder), kernel=kernel)
    for ordinal, index in enumerate(blocks):
        attn = encoder.blocks[index].attn
        stock = attn.attn
        attn.attn = HilbertEncoderAttention(stock, ordinal, ctx, stock.scale)
    stock_forward = type(encoder).forward

    def forward(x, grid_thw=None, *args, **kwargs):
        with ctx.frames(grid_thw):
            return stock_forward(encoder, x, grid_thw, *args, **kwargs)

    encoder.forward = forward
    encoder._kvflow_hilberta = ctx
    logger.info("kvflow: HilbertA in %s blocks %s (%s)", type(encoder).__name__, blocks,
                ctx.settings.identity())
    return ctx


def disable(encoder) -> None:
    """Undo enable: the stock op in every block, the class's forward (also after an
    enable that raised half-way)."""
    for block in getattr(encoder, "blocks", ()):
        op = block.attn.attn
        if isinstance(op, HilbertEncoderAttention):
            block.attn.attn = op.stock
    vars(encoder).pop("forward", None)
    vars(encoder).pop("_kvflow_hilberta", None)


def configured_mode(vllm_config) -> str:
    """The kvflow connector's vision_attention setting in this vLLM config ("stock" when
    the engine has no kvflow connector or leaves it unset). ValueError if misspelled."""
    from vllm_kvflow.config import VISION_ATTENTION
    from vllm_kvflow.plugin import connector_settings

    mode = (connector_settings(vllm_config) or {}).get("vision_attention", "stock")
    if mode not in VISION_ATTENTION:
        raise ValueError(f"kvflow: vision_attention must be one of {VISION_ATTENTION}, got {mode!r}")
    return mode


def _current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def _wrap_init(family: EncoderFamily):
    def patch(module) -> None:
        cls = getattr(module, family.cls, None)
        init = getattr(cls, "__init__", None)
        if init is None or getattr(init, "_kvflow_wrapped", False):
            return

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            vllm_config = _current_vllm_config()
            if configured_mode(vllm_config) == "hilberta":
                compilation = getattr(vllm_config, "compilation_config", None)
                if getattr(compilation, "cudagraph_mm_encoder", False):
                    logger.warning("kvflow: encoder CUDA graphs replay without grid_thw, so "
                                   "captured encoder runs keep the stock attention")
                enable(self, family=family)

        __init__._kvflow_wrapped = True
        cls.__init__ = __init__

    patch.__qualname__ = f"vision_attention.{family.cls}"
    return patch


def install() -> None:
    """Wrap the encoders' constructors when (and where) their modules are imported."""
    for family in FAMILIES:
        when_imported(family.module, _wrap_init(family))

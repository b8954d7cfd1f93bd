"""Model-family adapters: where a vLLM model keeps its embedding, layers and attention.

The executor runs vLLM's own decoder layers (so quantized linear layers, fused norms,
Qwen3's q_norm/k_norm and the model's own RoPE all apply unchanged); it only needs to
know how to reach them. Families whose decoder layer is called as
`layer(positions, hidden_states, residual)` and whose attention module is
`layer.self_attn.attn` share one adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Architecture name -> adapter class. Add a family by registering its name here.
ADAPTERS: dict[str, type["DecoderAdapter"]] = {}


def register_adapter(*architectures: str):
    def deco(cls):
        for arch in architectures:
            ADAPTERS[arch] = cls
        return cls

    return deco


@dataclass
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


@register_adapter(
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
)
class DecoderAdapter:
    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers"):
            raise TypeError(f"{type(model).__name__} has no .model.layers")
        self.model = model
        self.inner = inner
        self.layers: list[nn.Module] = list(inner.layers)
        self.attn_modules: list[nn.Module] = [layer.self_attn.attn for layer in self.layers]
        first = self.attn_modules[0]
        self.shape = AttentionShape(
            num_heads=first.num_heads,
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_size,
            scale=float(first.impl.scale),
        )
        self.rotary = self.layers[0].self_attn.rotary_emb
        # Every layer: configs with layer_types can interleave full and sliding layers.
        if any(getattr(m, "sliding_window", None) for m in self.attn_modules):
            raise NotImplementedError("kvflow: sliding-window attention is not supported")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if hasattr(self.inner, "embed_input_ids"):
            return self.inner.embed_input_ids(token_ids)
        return self.inner.get_input_embeddings(token_ids)

    def layer_forward(self, idx: int, positions, hidden, residual):
        return self.layers[idx](positions, hidden, residual)

    def rope_cache(self) -> tuple[torch.Tensor, int, bool]:
        """(cos_sin_cache [max_pos, rotary_dim], rotary_dim, is_neox) of the model's RoPE."""
        rope = self.rotary
        cache = rope.cos_sin_cache
        return cache, cache.shape[-1], bool(rope.is_neox_style)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    arch = type(model).__name__
    cls = ADAPTERS.get(arch)
    if cls is None:
        raise NotImplementedError(
            f"kvflow: no adapter for {arch}; supported: {sorted(ADAPTERS)}"
        )
    return cls(model)

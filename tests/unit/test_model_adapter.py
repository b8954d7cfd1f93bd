"""DecoderAdapter on stand-in modules (the real families run in tests/engine)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_kvflow.blend.model_adapter import DecoderAdapter


def _model(windows):
    """A .model.layers[i].self_attn.attn stack with one sliding window per layer."""
    layers = torch.nn.ModuleList()
    for window in windows:
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.attn = SimpleNamespace(num_heads=4, num_kv_heads=2, head_size=64,
                                               impl=SimpleNamespace(scale=0.125),
                                               sliding_window=window)
        layer.self_attn.rotary_emb = None
        layers.append(layer)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = layers
    return model


def test_full_attention_layers_are_accepted():
    adapter = DecoderAdapter(_model([None, None, None]))
    assert adapter.num_layers == 3 and adapter.shape.num_kv_heads == 2


def test_sliding_window_in_a_later_layer_is_refused():
    # layer_types configs interleave: layer 0 full attention, layer 1 sliding.
    with pytest.raises(NotImplementedError, match="sliding-window"):
        DecoderAdapter(_model([None, 4096, None]))

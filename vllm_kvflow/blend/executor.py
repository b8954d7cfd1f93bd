"""Layer-wise partial prefill: run any subset of a request's tokens through the model's
own decoder layers, attending over a KV store (the request's paged cache, or a private
dense buffer), with the causal mask key_pos <= query_pos.

vLLM's attention modules are replaced for the duration of a call by a function that
(1) writes the subset's new K/V at its positions (unless scoring), (2) attends over the
KV of all positions up to the subset's last one. Everything else (projections, RoPE,
norms, MLP) is the model's own code.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from vllm_kvflow.blend.attention import masked_attention
from vllm_kvflow.blend.model_adapter import DecoderAdapter
from vllm_kvflow.blend.paged import use_kernels


class LayerwiseExecutor:
    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.shape = adapter.shape

    @contextlib.contextmanager
    def _attention_hook(self, attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        """Route each layer's `self.attn(q, k, v)` to attend(layer_idx, q, k, v)."""
        modules = self.adapter.attn_modules
        for idx, module in enumerate(modules):
            module.forward = (lambda i: lambda q, k, v, *a, **kw: attend(i, q, k, v))(idx)
        try:
            yield
        finally:
            for module in modules:
                del module.forward  # back to the class's forward

    def _split_heads(self, q, k, v):
        s = self.shape
        n = q.shape[0]
        return (q.view(n, s.num_heads, s.head_dim), k.view(n, s.num_kv_heads, s.head_dim),
                v.view(n, s.num_kv_heads, s.head_dim))

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, kv, num_layers: int | None = None):
        """Compute the tokens at `positions` (sorted) and write their K/V into kv.

        kv needs write(layer, positions, k, v) and read(layer, length) -> (K, V) over
        positions [0, length). Every position below max(positions) must already hold
        valid KV in kv (or be among `positions`).
        """
        length = int(positions[-1]) + 1

        def attend(layer, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            kv.write(layer, positions, k, v)
            return kv.attend(layer, q, positions, length, self.shape.scale).flatten(1)

        self._run(token_ids, positions, attend, num_layers)

    @torch.inference_mode()
    def score(self, token_ids, positions, kv, context_len: int, layers: list[int]):
        """Query attention-norm of context columns [0, context_len) from the tokens at
        `positions` (the question, placed after the context), averaged over `layers`.

        The question attends to the context and to itself, as if it followed the context
        directly (tokens between them, e.g. "Question: ", are not computed yet): key-array
        entry context_len + i holds question token i. The question's K/V stay in a
        scratch copy, never written into kv. (On CUDA the pipeline scores in place in the
        request's paged cache instead: blend/pass_graphs.py.)
        """
        from vllm_kvflow.kernels.attn_norm import attn_norm, attn_norm_reference

        dev = positions.device
        n = positions.numel()
        # Row i of the question sees key-array entries [0, context_len + i].
        row_pos = context_len + torch.arange(n, device=dev)
        key_pos = torch.cat([torch.arange(context_len, device=dev), positions])
        wanted = set(layers)
        total = torch.zeros(context_len, dtype=torch.float32, device=dev)
        scale = self.shape.scale

        def attend(layer, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            keys, values = kv.read(layer, context_len)
            keys = torch.cat([keys, k.to(keys.dtype)])
            values = torch.cat([values, v.to(values.dtype)])
            if layer in wanted:
                # Keys of context + question sit contiguously: one page, block table [0].
                page, table = keys.unsqueeze(0), torch.zeros(1, dtype=torch.int32, device=dev)
                fn = attn_norm if use_kernels(keys) else attn_norm_reference
                total.add_(fn(q, page, table, keys.shape[0], row_pos, context_len, scale).float())
            return masked_attention(q, keys, values, positions, key_pos, scale).flatten(1)

        self._run(token_ids, positions, attend, max(layers) + 1)
        return total / len(wanted)

    @torch.inference_mode()
    def key_deviation(self, token_ids, positions, kv, layer: int) -> torch.Tensor:
        """CacheBlend's signal: recompute the tokens at `positions` through layers
        0..layer-1 (writing their K/V, i.e. those layers are fully recomputed), then
        return ||K_recomputed - K_cached||_2 per token at `layer` (nothing written there)."""
        length = int(positions[-1]) + 1
        deviation = torch.zeros(positions.numel(), device=positions.device)

        def attend(l, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            if l == layer:
                cached, _ = kv.read(l, length)
                deviation.copy_((k.float() - cached[positions].float()).flatten(1).norm(dim=1))
                return torch.zeros_like(q).flatten(1)
            kv.write(l, positions, k, v)
            return kv.attend(l, q, positions, length, self.shape.scale).flatten(1)

        self._run(token_ids, positions, attend, layer + 1)
        return deviation

    def _run(self, token_ids, positions, attend, num_layers):
        adapter = self.adapter
        n_layers = adapter.num_layers if num_layers is None else num_layers
        from vllm_kvflow.patches.eager_ops import fast_eager_ops

        hidden = adapter.embed(token_ids)
        residual = None
        with self._attention_hook(attend), fast_eager_ops(getattr(adapter, "model", None), token_ids.device):
            for idx in range(n_layers):
                hidden, residual = adapter.layer_forward(idx, positions, hidden, residual)
        return hidden, residual

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

from vllm_kvflow.blend.model_adapter import DecoderAdapter

# Queries attended per SDPA call: bounds the [H, q, k] score memory on long contexts.
_QUERY_BLOCK = 1024


def masked_attention(q, k, v, q_pos, k_pos, scale):
    """softmax(q k^T * scale, mask k_pos <= q_pos) v with GQA, math in float32.

    q [n, Hq, D]; k, v [N, Hkv, D]; returns [n, Hq, D] in q's dtype.
    """
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    kf = k.float().transpose(0, 1)  # [Hkv, N, D]
    vf = v.float().transpose(0, 1)
    if group > 1:
        kf = kf.repeat_interleave(group, dim=0)
        vf = vf.repeat_interleave(group, dim=0)
    out = torch.empty_like(q)
    for s in range(0, n, _QUERY_BLOCK):
        e = min(s + _QUERY_BLOCK, n)
        mask = k_pos[None, :] <= q_pos[s:e, None]  # [b, N]
        qb = q[s:e].float().transpose(0, 1)  # [Hq, b, D]
        ob = torch.nn.functional.scaled_dot_product_attention(
            qb, kf, vf, attn_mask=mask, scale=scale
        )
        out[s:e] = ob.transpose(0, 1).to(q.dtype)
    return out


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
        key_pos = torch.arange(length, device=positions.device)

        def attend(layer, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            kv.write(layer, positions, k, v)
            keys, values = kv.read(layer, length)
            out = masked_attention(q, keys, values, positions, key_pos, self.shape.scale)
            return out.flatten(1)

        self._run(token_ids, positions, attend, num_layers)

    @torch.inference_mode()
    def score(self, token_ids, positions, kv, context_len: int, layers: list[int]):
        """Query attention-norm of context columns [0, context_len) from the tokens at
        `positions` (the question, placed after the context), averaged over `layers`.

        The question's own K/V are kept in a scratch buffer, never written into kv.
        """
        from vllm_kvflow.kernels.attn_norm import attn_norm, attn_norm_reference

        ctx_pos = torch.arange(context_len, device=positions.device)
        key_pos = torch.cat([ctx_pos, positions])
        # Row i of the question sees key-array entries [0, context_len + i].
        row_pos = context_len + torch.arange(positions.numel(), device=positions.device)
        wanted = set(layers)
        total = torch.zeros(context_len, dtype=torch.float32, device=positions.device)

        def attend(layer, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            keys, values = kv.read(layer, context_len)
            keys = torch.cat([keys, k.to(keys.dtype)])
            values = torch.cat([values, v.to(values.dtype)])
            if layer in wanted:
                # Keys of context + question sit contiguously: one page, block table [0].
                page, table = keys.unsqueeze(0), torch.zeros(1, dtype=torch.int32, device=keys.device)
                fn = attn_norm if keys.is_cuda else attn_norm_reference
                total.add_(fn(q, page, table, keys.shape[0], row_pos, context_len,
                              self.shape.scale).float())
            return masked_attention(q, keys, values, positions, key_pos, self.shape.scale).flatten(1)

        self._run(token_ids, positions, attend, max(layers) + 1)
        return total / len(wanted)

    @torch.inference_mode()
    def key_deviation(self, token_ids, positions, kv, layer: int) -> torch.Tensor:
        """CacheBlend's signal: recompute the tokens at `positions` through layers
        0..layer-1 (writing their K/V, i.e. those layers are fully recomputed), then
        return ||K_recomputed - K_cached||_2 per token at `layer` (nothing written there)."""
        length = int(positions[-1]) + 1
        key_pos = torch.arange(length, device=positions.device)
        deviation = torch.zeros(positions.numel(), device=positions.device)

        def attend(l, q, k, v):
            q, k, v = self._split_heads(q, k, v)
            if l == layer:
                cached, _ = kv.read(l, length)
                deviation.copy_((k.float() - cached[positions].float()).flatten(1).norm(dim=1))
                return torch.zeros_like(q).flatten(1)
            kv.write(l, positions, k, v)
            keys, values = kv.read(l, length)
            return masked_attention(q, keys, values, positions, key_pos, self.shape.scale).flatten(1)

        self._run(token_ids, positions, attend, layer + 1)
        return deviation

    def _run(self, token_ids, positions, attend, num_layers):
        adapter = self.adapter
        n_layers = adapter.num_layers if num_layers is None else num_layers
        hidden = adapter.embed(token_ids)
        residual = None
        with self._attention_hook(attend):
            for idx in range(n_layers):
                hidden, residual = adapter.layer_forward(idx, positions, hidden, residual)
        return hidden, residual

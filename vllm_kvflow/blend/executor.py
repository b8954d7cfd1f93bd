"""Layer-wise partial prefill: run any subset of tokens through the model's own decoder
layers, attending over a KV target (a request's paged cache, or a private dense buffer),
with the causal mask key_pos <= query_pos.

A pass may carry the rows of several sequences at once (`RowGroup`s: the recompute rows
of several requests, or several chunks computed in isolation). Their rows go through the
projections, norms and MLP together, one larger matrix product per layer instead of one
per sequence; only attention is per group, each over its own KV.

vLLM's attention modules are replaced for the duration of a pass by a function that, per
group, (1) writes the group's new K/V at its positions (unless scoring) and (2) attends
over the group's KV up to its last position. Everything else (projections, RoPE, norms,
MLP) is the model's own code. The passes run in the engine's own thread (between its
forward passes), so swapping the modules' forward for the pass is safe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vllm_kvflow.blend.attention import masked_attention
from vllm_kvflow.blend.dense_batch import attention_plan
from vllm_kvflow.blend.model_adapter import DecoderAdapter
from vllm_kvflow.blend.paged import use_kernels

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RowGroup:
    """The rows of one sequence in a pass: token ids and RoPE positions (sorted, on the
    model's device) and the KV target they write to and attend over (write/read/attend,
    see blend/paged.py)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    kv: Any
    # Keys visible to the group: up to its last position. None: read from the positions,
    # which waits for the device (callers that know it pass it).
    length: int | None = None

    def __post_init__(self) -> None:
        if self.length is None:
            self.length = int(self.positions[-1]) + 1 if self.positions.numel() else 0


class LayerwiseExecutor:
    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.shape = adapter.shape

    # -- the layer loop (also used by blend/pass_graphs.py) -------------------------------
    def split_heads(self, q, k, v):
        """q, k, v of a layer's attention call, [n, heads * head_dim] -> [n, heads, head_dim]."""
        s = self.shape
        n = q.shape[0]
        return (q.view(n, s.num_heads, s.head_dim), k.view(n, s.num_kv_heads, s.head_dim),
                v.view(n, s.num_kv_heads, s.head_dim))

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend,
            num_layers: int | None = None):
        """Rows through the first num_layers decoder layers (all by default), each layer's
        attention replaced by attend(layer, q, k, v) -> [n, heads * head_dim]. Returns the
        last layer's (hidden, residual)."""
        adapter = self.adapter
        n_layers = adapter.num_layers if num_layers is None else num_layers
        from vllm_kvflow.patches.eager_ops import fast_eager_ops

        hidden = adapter.embed(token_ids)
        residual = None
        with self._attention_hook(attend), fast_eager_ops(getattr(adapter, "model", None), token_ids.device):
            for idx in range(n_layers):
                hidden, residual = adapter.layer_forward(idx, positions, hidden, residual)
        return hidden, residual

    @contextlib.contextmanager
    def _attention_hook(self, attend: Attend):
        """Route each layer's `self.attn(q, k, v)` to attend(layer_idx, q, k, v)."""
        modules = self.adapter.attn_modules
        for idx, module in enumerate(modules):
            module.forward = (lambda i: lambda q, k, v, *a, **kw: attend(i, q, k, v))(idx)
        try:
            yield
        finally:
            for module in modules:
                del module.forward  # back to the class's forward

    # -- passes ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_groups(self, groups: list[RowGroup], num_layers: int | None = None) -> None:
        """Compute every group's rows and write their K/V into the group's target. Within
        a group, every position below its last must already hold valid KV in the target
        (or be among the group's positions)."""
        groups = [g for g in groups if g.positions.numel()]
        if not groups:
            return
        scale = self.shape.scale
        # Per group its target's write and attend; groups in one shared buffer, batched.
        plan = attention_plan(groups, _bounds(groups))

        def attend(layer, q, k, v):
            q, k, v = self.split_heads(q, k, v)
            out = torch.empty_like(q)
            for unit in plan:
                unit(layer, q, k, v, out, scale)
            return out.flatten(1)

        ids, positions = _concat(groups)
        self.run(ids, positions, attend, num_layers)

    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, kv, num_layers: int | None = None):
        """One sequence's prefill_groups: the tokens at `positions` (sorted) into kv."""
        self.prefill_groups([RowGroup(token_ids, positions, kv)], num_layers)

    @torch.inference_mode()
    def score_groups(self, groups: list[RowGroup], context_lens: list[int],
                     layers: list[int]) -> list[torch.Tensor]:
        """Per group, the query attention-norm of its context columns [0, context_len)
        from its rows (the question, placed after the context), averaged over `layers`.

        A group's question attends to its context and to itself, as if it followed the
        context directly (tokens between them, e.g. "Question: ", are not computed yet):
        key-array entry context_len + i holds question token i. The question's K/V stay
        in a scratch copy, never written into the target. (On the kernel path requests
        score in place in their paged caches instead, batched: blend/pass_graphs.py.)"""
        from vllm_kvflow.kernels.attn_norm import attn_norm, attn_norm_reference

        scale = self.shape.scale
        wanted = set(layers)
        bounds = _bounds(groups)
        plans = []
        for g, context_len in zip(groups, context_lens):
            dev = g.positions.device
            n = g.positions.numel()
            # Row i of the question sees key-array entries [0, context_len + i].
            row_pos = context_len + torch.arange(n, device=dev)
            key_pos = torch.cat([torch.arange(context_len, device=dev), g.positions])
            plans.append((row_pos, key_pos, torch.zeros(context_len, dtype=torch.float32, device=dev)))

        def attend(layer, q, k, v):
            q, k, v = self.split_heads(q, k, v)
            out = torch.empty_like(q)
            for g, (a, b), context_len, (row_pos, key_pos, total) in zip(groups, bounds, context_lens, plans):
                keys, values = g.kv.read(layer, context_len)
                keys = torch.cat([keys, k[a:b].to(keys.dtype)])
                values = torch.cat([values, v[a:b].to(values.dtype)])
                if layer in wanted:
                    # Keys of context + question sit contiguously: one page, block table [0].
                    page = keys.unsqueeze(0)
                    table = torch.zeros(1, dtype=torch.int32, device=keys.device)
                    fn = attn_norm if use_kernels(keys) else attn_norm_reference
                    total.add_(fn(q[a:b], page, table, keys.shape[0], row_pos, context_len, scale).float())
                out[a:b] = masked_attention(q[a:b], keys, values, g.positions, key_pos, scale)
            return out.flatten(1)

        ids, positions = _concat(groups)
        self.run(ids, positions, attend, max(layers) + 1)
        return [total / len(wanted) for _, _, total in plans]

    def score(self, token_ids, positions, kv, context_len: int, layers: list[int]):
        """One sequence's score_groups."""
        return self.score_groups([RowGroup(token_ids, positions, kv)], [context_len], layers)[0]

    @torch.inference_mode()
    def key_deviation(self, token_ids, positions, kv, layer: int,
                      length: int | None = None) -> torch.Tensor:
        """CacheBlend's signal: recompute the tokens at `positions` through layers
        0..layer-1 (writing their K/V, i.e. those layers are fully recomputed), then
        return ||K_recomputed - K_cached||_2 per token at `layer` (nothing written there).
        length: the last position + 1; None reads it from the positions, which makes the
        host wait for the device (callers that know it pass it)."""
        length = int(positions[-1]) + 1 if length is None else length
        deviation = torch.zeros(positions.numel(), device=positions.device)

        def attend(l, q, k, v):
            q, k, v = self.split_heads(q, k, v)
            if l == layer:
                cached, _ = kv.read(l, length)
                deviation.copy_((k.float() - cached[positions].float()).flatten(1).norm(dim=1))
                return torch.zeros_like(q).flatten(1)
            kv.write(l, positions, k, v)
            return kv.attend(l, q, positions, length, self.shape.scale).flatten(1)

        self.run(token_ids, positions, attend, layer + 1)
        return deviation


def _bounds(groups: list[RowGroup]) -> list[tuple[int, int]]:
    out, a = [], 0
    for g in groups:
        out.append((a, a + g.positions.numel()))
        a += g.positions.numel()
    return out


def _concat(groups: list[RowGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(groups) == 1:
        return groups[0].token_ids, groups[0].positions
    return torch.cat([g.token_ids for g in groups]), torch.cat([g.positions for g in groups])

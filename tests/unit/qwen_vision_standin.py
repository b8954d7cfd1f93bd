"""A stand-in for vLLM 0.26's Qwen2.5-VL vision encoder, for patching tests without
torchvision (which vLLM's real module needs to import).

It keeps what patches/vision_attention.py touches, with vLLM 0.26's names and call
signatures: Qwen2_5_VisionTransformer with blocks[i].attn.attn (an op called as
attn(query=, key=, value=, cu_seqlens=, max_seqlen=, sequence_lengths=) on [1, S, H, D]),
fullatt_block_indexes, spatial_merge_size, window_size, patch_size,
get_window_index_thw(t, h, w) and forward(x, grid_thw, *, encoder_metadata=None); and
what makes the token order matter: units reordered into windows before the blocks, the
windowed blocks attending per window, the full ones per frame, the order undone after.
The blocks are pre-norm attention + MLP residual blocks with random weights; no patch
embedding, rotary or merger (they do not touch the order or the attention op)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_units_in_order(t, llm_h, llm_w, win):
    """An item's units (frame-major, row-major index) in window order, written as loops."""
    out = []
    for f in range(t):
        for wr in range(0, llm_h, win):
            for wc in range(0, llm_w, win):
                for r in range(wr, min(wr + win, llm_h)):
                    for c in range(wc, min(wc + win, llm_w)):
                        out.append(f * llm_h * llm_w + r * llm_w + c)
    return out


class EncoderAttentionOp(torch.nn.Module):
    """vLLM's MMEncoderAttention, reduced to its contract: dense attention per
    cu_seqlens sequence."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.calls = 0

    def forward(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
        self.calls += 1
        out = torch.empty_like(query)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds, bounds[1:]):
            q, k, v = (x[:, a:b].transpose(1, 2) for x in (query, key, value))
            out[:, a:b] = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2)
        return out


class VisionAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.attn = EncoderAttentionOp(self.head_dim ** -0.5)

    def forward(self, x, cu_seqlens, max_seqlen):
        s = x.shape[0]  # x: [S, 1, C], as vLLM's blocks see it
        q, k, v = self.qkv(x).view(s, 1, 3, self.heads, self.head_dim).permute(2, 1, 0, 3, 4)
        out = self.attn(query=q, key=k, value=v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                        sequence_lengths=None)
        return self.proj(out.reshape(1, s, -1).transpose(0, 1))


class VisionBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = VisionAttention(dim, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, dim))

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VisionTransformer(torch.nn.Module):
    def __init__(self, dim=32, heads=2, depth=6, fullatt_block_indexes=(1, 3, 5),
                 patch_size=14, spatial_merge_size=2, window_size=112):
        super().__init__()
        self.blocks = torch.nn.ModuleList(VisionBlock(dim, heads) for _ in range(depth))
        self.fullatt_block_indexes = list(fullatt_block_indexes)
        self.patch_size, self.spatial_merge_size, self.window_size = patch_size, spatial_merge_size, window_size
        self.get_window_index_calls = 0

    def get_window_index_thw(self, grid_t, grid_h, grid_w):
        """(the item's units in window order, the windows' cumulative token counts)."""
        self.get_window_index_calls += 1
        m, win = self.spatial_merge_size, self.window_size // self.spatial_merge_size // self.patch_size
        llm_h, llm_w = grid_h // m, grid_w // m
        order = torch.tensor(window_units_in_order(grid_t, llm_h, llm_w, win))
        sizes = []
        for _ in range(grid_t):
            for wr in range(0, llm_h, win):
                for wc in range(0, llm_w, win):
                    sizes.append(min(win, llm_h - wr) * min(win, llm_w - wc) * m * m)
        return order, torch.tensor(sizes).cumsum(0).int()

    def forward(self, x, grid_thw, *, encoder_metadata=None):
        """x: [S, C] patch features in the processor's order (units, 4 patches each)."""
        if grid_thw is None:
            grid_thw = encoder_metadata["grid_thw"]
        unit = self.spatial_merge_size ** 2
        order, windows, frames, base, tok = [], [0], [0], 0, 0
        for t, h, w in grid_thw:
            idx, cu = self.get_window_index_thw(t, h, w)
            order.append(idx + base)
            base += idx.numel()
            windows += (cu + tok).tolist()
            frames += [tok + (f + 1) * h * w for f in range(t)]
            tok += t * h * w
        order = torch.cat(order)
        s = x.shape[0]
        h = x.view(s // unit, unit, -1)[order].reshape(s, 1, -1)
        full_cu, win_cu = torch.tensor(frames, dtype=torch.int32), torch.tensor(windows, dtype=torch.int32)
        for i, blk in enumerate(self.blocks):
            full = i in self.fullatt_block_indexes
            cu = full_cu if full else win_cu
            h = blk(h, cu, (cu[1:] - cu[:-1]).max())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return h.view(s // unit, unit, -1)[inverse].reshape(s, -1)

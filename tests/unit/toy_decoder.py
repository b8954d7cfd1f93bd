"""A toy decoder with the adapter surface LayerwiseExecutor uses (shape, num_layers,
attn_modules, embed, layer_forward) and the few things BlendPipeline reads of a model
(rope_cache, device, model): its 'layers' are the attention hook plus a mix, so
executor passes can be checked on CPU (and on a GPU without vLLM) in a few lines."""
from __future__ import annotations

import torch


def token_ids(n: int, seed: int) -> torch.Tensor:
    """n random token ids in [0, 1000) (the toy embeds any id), the same for the same seed."""
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


class Toy:
    """The adapter surface the executor uses: 3 'layers' that are attention plus a mix."""

    def __init__(self, Hq, Hkv, D, hidden=16, seed=0):
        from vllm_kvflow.blend.model_adapter import AttentionShape

        gen = torch.Generator().manual_seed(seed)
        self.shape = AttentionShape(Hq, Hkv, D, D ** -0.5)
        self.num_layers = 3
        self.attn_modules = [torch.nn.Module() for _ in range(3)]
        self.proj = torch.randn(3, hidden, (Hq + 2 * Hkv) * D, generator=gen) * 0.3
        self.mix = torch.randn(3, Hq * D, hidden, generator=gen) * 0.1
        self.split = [Hq * D, Hkv * D, Hkv * D]
        self.hidden = hidden
        self.model = torch.nn.Linear(1, 1)  # holds the dtype and device BlendPipeline reads

    @property
    def device(self):
        return self.proj.device

    def rope_cache(self):
        D = self.shape.head_dim
        freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        angles = torch.outer(torch.arange(8192, dtype=torch.float64), freqs)
        return torch.cat([angles.cos(), angles.sin()], -1).float(), D, True

    def embed(self, ids):
        return torch.nn.functional.one_hot(ids % self.hidden, self.hidden).float()

    def layer_forward(self, idx, positions, hidden, residual):
        # Positions enter like RoPE would: the graphs must hand the right ones over.
        rope_like = 1 + 0.1 * torch.sin(0.37 * positions[:, None].to(hidden.dtype))
        q, k, v = (hidden @ self.proj[idx] * rope_like).split(self.split, -1)
        out = self.attn_modules[idx](q, k, v)
        return hidden + out @ self.mix[idx], residual

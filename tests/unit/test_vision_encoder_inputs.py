"""The GPU benchmark's images and patch layout (patches/vision_encoder.py), on CPU: every
patch row holds the pixels of the patch the encoder's order says it is."""
from __future__ import annotations

import pytest
import torch

from vllm_kvflow.patches.vision_encoder import make_image, patchify


@pytest.mark.parametrize("kind", ["gradient", "noise", "shapes"])
def test_images_are_deterministic_uint8_and_not_flat(kind):
    a, b = make_image(kind, 70, 110, seed=3), make_image(kind, 70, 110, seed=3)
    assert a.shape == (3, 70, 110) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert a.float().std() > 20
    with pytest.raises(ValueError, match="gradient, noise or shapes"):
        make_image("stripes", 8, 8)


def test_patch_rows_are_merge_units_then_patches_then_channel_frame_pixels():
    p, m, t = 14, 2, 2
    x = torch.randn(3, 3 * p * m, 5 * p * m)           # 6 x 10 patches, 3 x 5 units
    rows = patchify(x, p, m, t)
    assert rows.shape == (60, 3 * t * p * p)
    gw_units = 5
    for k in range(60):
        unit, sub = divmod(k, m * m)
        r = (unit // gw_units) * m + sub // m
        c = (unit % gw_units) * m + sub % m
        values = rows[k].view(3, t, p, p)
        for frame in range(t):                           # a still image: equal frames
            assert torch.equal(values[:, frame], x[:, r * p:(r + 1) * p, c * p:(c + 1) * p])
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(torch.zeros(3, 28, 42))

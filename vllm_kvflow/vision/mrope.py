"""M-RoPE position ids of a prompt of text and images, and what moving a chunk does to them.

The rule (vLLM 0.26, Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions;
benchmarks/VLM_NOTES.md has the line references): positions are assigned left to right.
A text token gets the running position p on all three axes (t, h, w) and p advances by 1.
An image whose merged token grid is grid_t x grid_h x grid_w (patches / spatial merge)
starts at base = p: its token (i, j, k), in row-major order, gets
(base + i, base + j, base + k), and p then continues at base + max(grid_t, grid_h,
grid_w), one past its largest id (so the text after an image is numbered from there, not
from the image's token count).

Consequences for reuse: a chunk's ids, text or image, are (its own pattern) + base, the
same base on all three axes. Computed in isolation behind a sink of s text tokens its base
is s; placed in a prompt its base is wherever the prompt's running position stands. Moving
it therefore shifts all three ids of every token by one delta, base_new - s: the key
re-rotation is the 1-D one by that delta (csrc_triton/mrope_load.py). The delta is counted
in M-RoPE positions, which drift from token indices after every image.

Pure numpy; no vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ImagePlacement", "mrope_positions", "isolated_positions", "position_deltas"]


@dataclass(frozen=True)
class ImagePlacement:
    """An image's placeholder run in a prompt: offset (token index of its first
    placeholder) and its merged token grid (grid_t x grid_h x grid_w tokens)."""

    offset: int
    grid_t: int
    grid_h: int
    grid_w: int

    @property
    def num_tokens(self) -> int:
        return self.grid_t * self.grid_h * self.grid_w

    def grid_ids(self) -> np.ndarray:
        """[3, num_tokens] (i, j, k) of its tokens in row-major order."""
        t, h, w = np.meshgrid(np.arange(self.grid_t), np.arange(self.grid_h),
                              np.arange(self.grid_w), indexing="ij")
        return np.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)]).astype(np.int64)

    @property
    def extent(self) -> int:
        """How far the running position advances over the image."""
        return max(self.grid_t, self.grid_h, self.grid_w)


def mrope_positions(num_tokens: int, images: Sequence[ImagePlacement] = (),
                    start: int = 0) -> np.ndarray:
    """int64 [3, num_tokens]: the (t, h, w) ids of a prompt whose images sit at the given
    placements (any order; they must not overlap or leave the prompt), the running
    position starting at `start`."""
    out = np.empty((3, num_tokens), dtype=np.int64)
    pos, cursor = start, 0
    for img in sorted(images, key=lambda im: im.offset):
        if img.offset < cursor or img.offset + img.num_tokens > num_tokens or img.num_tokens < 1:
            raise ValueError(f"image at {img.offset} ({img.num_tokens} tokens) overlaps another "
                             f"or leaves the {num_tokens}-token prompt")
        text = img.offset - cursor
        out[:, cursor:img.offset] = pos + np.arange(text)
        pos += text
        out[:, img.offset:img.offset + img.num_tokens] = pos + img.grid_ids()
        pos += img.extent
        cursor = img.offset + img.num_tokens
    out[:, cursor:] = pos + np.arange(num_tokens - cursor)
    return out


def isolated_positions(sink_len: int, length: int, image: ImagePlacement | None = None) -> np.ndarray:
    """[3, length] ids of a chunk computed alone behind a sink of sink_len text tokens:
    text (image None) or the image's own tokens (length must equal its token count)."""
    if image is None:
        return mrope_positions(sink_len + length)[:, sink_len:]
    if length != image.num_tokens:
        raise ValueError(f"an image chunk is its {image.num_tokens} tokens, got {length}")
    behind = ImagePlacement(sink_len, image.grid_t, image.grid_h, image.grid_w)
    return mrope_positions(sink_len + length, [behind])[:, sink_len:]


def position_deltas(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """int64 [T, 3] new - old ids per token (the layout csrc_triton/mrope_load.py reads)."""
    new, old = np.asarray(new), np.asarray(old)
    if new.shape != old.shape or new.ndim != 2 or new.shape[0] != 3:
        raise ValueError(f"positions must both be [3, T], got {new.shape} and {old.shape}")
    return np.ascontiguousarray((new - old).T.astype(np.int64))

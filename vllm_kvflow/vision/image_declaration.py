"""Image chunks in a request's declaration: `{"image": i}` names the request's i-th image.

An image chunk is the run of the image's placeholder tokens in the prompt (vLLM replaces
one image placeholder with one token per merged patch; the scheduler knows each run from
the request's multimodal features: offset and length). It mixes with text chunks in one
`chunks` list; the engine setting `image_chunks: "all"` makes every image of a request a
chunk without declaring it (a declared one is not added twice), and every image inside
the reused context is a chunk whatever the setting (complete_image_chunks says why).

request.parse_request calls these; they raise RequestError (the request is prefilled in
full, the reason in its stats) for an index that is not an int, out of range, or declared
twice, for an image chunk on a model that takes no images, and for a text chunk that
covers an image's placeholder tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from vllm_kvflow.request import RequestError

__all__ = ["ImageInput", "complete_image_chunks", "declared_image_span"]


@dataclass(frozen=True)
class ImageInput:
    """What the scheduler knows of a request's image (in the request's image order):
    where its placeholder tokens are, and its content identity if known (vision/image_key)."""

    offset: int
    length: int
    digest: str | None = None

    @property
    def span(self) -> tuple[int, int]:
        return self.offset, self.offset + self.length


def _check_images(images: Sequence[ImageInput] | None, prompt_len: int, what: str):
    if images is None:
        # The engine's scheduler side passes no images yet (image-chunk reuse is not
        # wired into the engine), so on any model an image chunk falls back here.
        raise RequestError(f"{what}: image chunks need a model that takes images and an "
                           "engine that reuses image KV; this one passes kvflow no images "
                           "(the request is prefilled in full)")
    for n, img in enumerate(images):
        if not 0 <= img.offset < img.offset + img.length <= prompt_len:
            # The engine's own data, not the client's: say so plainly.
            raise RequestError(f"image {n}: its placeholder tokens [{img.offset}, "
                               f"{img.offset + img.length}) are not inside the prompt of "
                               f"{prompt_len} tokens")
    return images


def declared_image_span(value: Any, images: Sequence[ImageInput] | None, prompt_len: int,
                        seen: set[int], what: str) -> tuple[int, int, int]:
    """(start, end, image index) of the chunk `{"image": value}`; records the index in
    `seen` (a second declaration of the same image is an error)."""
    images = _check_images(images, prompt_len, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what}: image must be an integer index into the request's "
                           f"images, got {value!r}")
    if not 0 <= value < len(images):
        count = f"{len(images)} image{'s' if len(images) != 1 else ''}"
        raise RequestError(f"{what}: image {value} does not exist (the request has {count}; "
                           "indices start at 0)")
    if value in seen:
        raise RequestError(f"{what}: image {value} is declared more than once")
    seen.add(value)
    return (*images[value].span, value)


def complete_image_chunks(spans: list[tuple[int, int, int]], image_of: dict[int, int],
                          images: Sequence[ImageInput] | None, prompt_len: int,
                          min_chunk_tokens: int, mode: str) -> list[tuple[int, int, int]]:
    """The request's chunk spans (start, end, declaration index) with the image rules
    applied; `image_of` (chunk start -> image index) gains the images added here, which
    get declaration index -1.

    * A text chunk (span, text or token ids) may not cover an image's placeholder tokens:
      their ids are the same for every image, so a chunk keyed by token ids would hand one
      image's KV to another.
    * Every image in the reused context (before the end of the last chunk that is long
      enough to be reused) is a chunk, declared or not: the context's glue is cached by
      token ids too, with the same hazard. Image chunks are never too short.
    * mode "all": every image is a chunk.
    """
    if images is None:
        return spans
    images = _check_images(images, prompt_len, "image_chunks")
    for s, e, i in spans:
        if s in image_of:
            continue
        for n, img in enumerate(images):
            a, b = img.span
            if a < e and s < b:
                raise RequestError(f"chunk {i}: [{s}, {e}) covers placeholder tokens of image "
                                   f"{n} [{a}, {b}); declare the image as {{'image': {n}}} "
                                   "and the text around it as separate chunks")
    declared = set(image_of.values())
    if mode == "all":
        wanted = [n for n in range(len(images)) if n not in declared]
    else:
        reused = [e for s, e, _ in spans if s in image_of or e - s >= min_chunk_tokens]
        end = max(reused, default=0)
        wanted = [n for n, img in enumerate(images)
                  if n not in declared and img.offset + img.length <= end]
    out = list(spans)
    for n in wanted:
        s, e = images[n].span
        out.append((s, e, -1))
        image_of[s] = n
    return out

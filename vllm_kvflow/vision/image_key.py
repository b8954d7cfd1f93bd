"""Identity of an image chunk: what its KV depends on, hashed collision-free.

An image chunk's KV (its placeholder tokens' keys and values, computed behind the sink)
depends on
  * the image's pixels as decoded (image_digest);
  * how the processor turned them into patches: its class (vLLM 0.26 may pick the
    torchvision or the PIL backend of transformers' Qwen2-VL processor, which resize
    differently), resize rule (min/max pixels, resample), rescale and normalisation, patch,
    temporal patch and merge sizes, after the request's mm_processor_kwargs overrides
    (processor_settings, the same merge vLLM 0.26 applies in Qwen2VLProcessingInfo.
    _get_vision_info);
  * the vision encoder's attention (stock or HilbertA with its layout parameters: the
    encoder's outputs, hence the KV, differ);
  * the model (weights, dtype), the namespace and the sink, as for text chunks.
Not on the text around it, nor on where it sits in a prompt (M-RoPE re-rotation moves it:
vision/mrope.py). image_chunk_key feeds these to SHA-256 as tagged, length-prefixed fields
(store/entry.py hash_fields), led by a kind field that no text chunk key has, so no image
key equals a text chunk's key or another image's with different fields.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

from vllm_kvflow.store.entry import hash_fields, int64_bytes

__all__ = ["IMAGE_CHUNK_KIND", "PROCESSOR_FIELDS", "image_chunk_key", "image_digest",
           "processor_settings"]

IMAGE_CHUNK_KIND = "kvflow-image-chunk-v1"

# The image processor's attributes that decide the patches of an image (transformers'
# Qwen2VLImageProcessor; absent ones are recorded as null).
PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
                    "patch_size", "temporal_patch_size", "merge_size")


def _plain(value: Any) -> Any:
    """A JSON-stable form of a processor attribute (enums by value, tuples as lists,
    mappings sorted, size objects by their fields)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value") and isinstance(value.value, (int, str)):  # an enum
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dict__"):  # e.g. transformers' SizeDict
        return _plain({k: v for k, v in vars(value).items() if v is not None})
    return repr(value)


def processor_settings(image_processor: Any, overrides: Mapping[str, Any] | None = None) -> str:
    """Canonical JSON of the settings that turn an image into patches.

    image_processor: the processor object (or a mapping of its attributes). overrides:
    the request's mm_processor_kwargs merged over the model's, applied the way vLLM 0.26
    applies them for Qwen2-VL-family models: `size` merged into the processor's size,
    `min_pixels` / `max_pixels` as its shortest / longest edge; any other override is kept
    under its own name."""
    get = (image_processor.get if isinstance(image_processor, Mapping)
           else lambda name, default=None: getattr(image_processor, name, default))
    fields = {name: _plain(get(name, None)) for name in PROCESSOR_FIELDS}
    size = dict(fields["size"] or {})
    extra = {}
    for name, value in sorted((overrides or {}).items()):
        if name == "size" and isinstance(value, Mapping):
            size.update(_plain(value))
        elif name == "min_pixels" and value is not None:
            size["shortest_edge"] = _plain(value)
        elif name == "max_pixels" and value is not None:
            size["longest_edge"] = _plain(value)
        else:
            extra[name] = _plain(value)
    fields["size"] = dict(sorted(size.items())) if size or fields["size"] is not None else None
    kind = (image_processor.get("class") if isinstance(image_processor, Mapping)
            else type(image_processor).__qualname__)
    return json.dumps({"class": kind, "fields": fields, "overrides": extra},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)


def image_digest(image: Any) -> str:
    """SHA-256 of an image's decoded pixels with their layout: a PIL image (mode, size,
    pixel bytes), a numpy array or a torch tensor (dtype, shape, bytes). Two files that
    decode to the same pixels have one digest; any pixel, size or mode change gives
    another."""
    h = hashlib.sha256()
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        hash_fields(h, "pil", image.mode, int64_bytes(list(image.size)), image.tobytes())
        return h.hexdigest()
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().contiguous().numpy()
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        hash_fields(h, "array", arr.dtype.str, int64_bytes(list(arr.shape)), arr.tobytes())
        return h.hexdigest()
    raise TypeError(f"image_digest takes a PIL image, numpy array or torch tensor, got "
                    f"{type(image).__name__}")


def image_chunk_key(model_id: str, namespace: str, sink_ids, digest: str, settings: str,
                    encoder: str, num_tokens: int) -> str:
    """Store key of an image chunk (module docstring). digest: image_digest (or another
    content hash of the pixels); settings: processor_settings; encoder: the vision
    attention's identity (vision/encoder_attention.py, encoder_identity); num_tokens: its
    placeholder tokens (implied by the others; a check that they agree)."""
    for name, value in (("digest", digest), ("settings", settings), ("encoder", encoder)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"image_chunk_key: {name} must be a non-empty string")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"image_chunk_key: num_tokens must be a positive integer, got {num_tokens!r}")
    h = hashlib.sha256()
    hash_fields(h, IMAGE_CHUNK_KIND, model_id, namespace, int64_bytes(sink_ids), digest,
                settings, encoder, int64_bytes([num_tokens]))
    return h.hexdigest()

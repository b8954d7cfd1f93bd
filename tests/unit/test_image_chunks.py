"""Image chunks: their store key (vision/image_key.py) and their declaration
(`{"image": i}` in request.py, rules in vision/image_declaration.py), bad inputs included."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.request import RequestError, parse_request
from vllm_kvflow.store.entry import chunk_key
from vllm_kvflow.vision.image_declaration import ImageInput
from vllm_kvflow.vision.image_key import (IMAGE_CHUNK_KIND, image_chunk_key, image_digest,
                                          processor_settings)

PAD = 151655  # Qwen2.5-VL's <|image_pad|>; any id works, placeholders only need to repeat

# A prompt: 20 text tokens, image 0 (24 tokens), 30 text, image 1 (4 tokens), 30 text,
# image 2 (16 tokens), 10 text (the question).
TEXT = iter(range(1000, 2000))


def _text(n):
    return [next(TEXT) for _ in range(n)]


PROMPT = _text(20) + [PAD] * 24 + _text(30) + [PAD] * 4 + _text(30) + [PAD] * 16 + _text(10)
IMAGES = [ImageInput(20, 24, "a" * 64), ImageInput(74, 4, "b" * 64), ImageInput(108, 16, "c" * 64)]
assert len(PROMPT) == 134


def _parse(params, images=IMAGES, **settings):
    return parse_request(params, PROMPT, KVFlowConfig(**settings), images=images)


# -- declaration: accepted forms ------------------------------------------------------------
def test_image_and_text_chunks_mix_in_one_list():
    spec = _parse({"chunks": [{"span": [44, 74]}, {"image": 0}, {"image": 1}]})
    assert spec.chunks == [(20, 44), (44, 74), (74, 78)]
    assert spec.images == {20: 0, 74: 1}          # chunk start -> image index
    assert spec.too_short == []                    # a 4-token image is never "too short"
    assert spec.question == (78, 134)


def test_images_in_the_reused_context_are_chunks_even_undeclared():
    # The context runs to the end of the text chunk at 78..108, past images 0 and 1:
    # their placeholders would otherwise be glue, cached by token ids alone.
    spec = _parse({"chunks": [{"span": [78, 108]}]})
    assert spec.chunks == [(20, 44), (74, 78), (78, 108)]
    assert spec.images == {20: 0, 74: 1}
    # Image 2 lies after the context: vLLM prefills it (and runs its encoder) as usual.
    assert 2 not in spec.images.values()


def test_image_chunks_all_makes_every_image_a_chunk_without_a_declaration():
    spec = _parse({}, image_chunks="all")
    assert spec.chunks == [(20, 44), (74, 78), (108, 124)]
    assert spec.images == {20: 0, 74: 1, 108: 2}
    # Declared ones are not added twice, and text chunks still mix in.
    spec = _parse({"chunks": [{"image": 2}, {"span": [44, 74]}]}, image_chunks="all")
    assert spec.chunks == [(20, 44), (44, 74), (74, 78), (108, 124)]
    assert spec.images == {20: 0, 74: 1, 108: 2}


def test_a_request_without_images_on_a_multimodal_model_is_a_text_request():
    prompt = list(range(100))
    spec = parse_request({"chunks": [{"span": [0, 40]}]}, prompt, KVFlowConfig(image_chunks="all"),
                         images=[])
    assert spec.chunks == [(0, 40)] and spec.images == {}
    with pytest.raises(RequestError, match="chunks must be a non-empty list"):
        parse_request({}, prompt, KVFlowConfig(image_chunks="all"), images=[])


def test_text_requests_are_unchanged_by_the_image_support():
    prompt = list(range(100))
    spec = parse_request({"chunks": [{"span": [0, 40]}, {"span": [50, 70]}]}, prompt, KVFlowConfig())
    assert spec.chunks == [(0, 40), (50, 70)] and spec.images == {}


# -- declaration: bad inputs -----------------------------------------------------------------
@pytest.mark.parametrize("value,message", [
    (3, r"image 3 does not exist \(the request has 3 images; indices start at 0\)"),
    (-1, "image -1 does not exist"),
    ("0", "image must be an integer index"),
    (1.0, "image must be an integer index"),
    (True, "image must be an integer index"),
    (None, "image must be an integer index"),
    ([0], "image must be an integer index"),
])
def test_bad_image_indices_are_refused(value, message):
    with pytest.raises(RequestError, match=message):
        _parse({"chunks": [{"span": [44, 74]}, {"image": value}]})


def test_an_index_on_a_request_with_one_or_no_images_says_how_many():
    with pytest.raises(RequestError, match=r"image 1 does not exist \(the request has 1 image;"):
        _parse({"chunks": [{"image": 1}]}, images=IMAGES[:1])
    with pytest.raises(RequestError, match=r"the request has 0 images"):
        parse_request({"chunks": [{"image": 0}]}, list(range(50)), KVFlowConfig(), images=[])


def test_image_chunk_on_a_text_only_model_is_refused():
    with pytest.raises(RequestError, match="chunk 1: image chunks need a model that takes images"):
        _parse({"chunks": [{"span": [44, 74]}, {"image": 0}]}, images=None)


def test_an_image_declared_twice_is_refused():
    with pytest.raises(RequestError, match="chunk 2: image 0 is declared more than once"):
        _parse({"chunks": [{"image": 0}, {"span": [44, 74]}, {"image": 0}]})


@pytest.mark.parametrize("chunk", [
    {"span": [10, 30]},                  # reaches into image 0
    {"span": [0, 134]},                  # covers everything
    {"token_ids": [PAD] * 8},            # located inside image 0's placeholders
    {"span": [75, 77]},                  # inside image 1 (short, but still refused)
])
def test_text_chunks_covering_image_placeholders_are_refused(chunk):
    with pytest.raises(RequestError, match=r"covers placeholder tokens of image \d"):
        _parse({"chunks": [chunk]}, min_chunk_tokens=1)


def test_an_image_overlapping_a_declared_text_chunk_is_refused_in_all_mode():
    with pytest.raises(RequestError, match="covers placeholder tokens of image 2"):
        _parse({"chunks": [{"span": [100, 112]}]}, image_chunks="all", min_chunk_tokens=1)


def test_other_keys_in_an_image_chunk_are_refused():
    with pytest.raises(RequestError, match=r"\{'image': i\}"):
        _parse({"chunks": [{"image": 0, "span": [0, 5]}]})


def test_placeholders_outside_the_prompt_are_an_error_not_a_crash():
    with pytest.raises(RequestError, match=r"image 1: its placeholder tokens \[130, 140\)"):
        _parse({"chunks": [{"image": 0}]}, images=[IMAGES[0], ImageInput(130, 10)])


@pytest.mark.parametrize("name,value", [("image_chunks", "every"), ("image_chunks", None),
                                        ("vision_attention", "flash"), ("vision_attention", 1)])
def test_settings_are_validated(name, value):
    with pytest.raises(ValueError, match=name):
        KVFlowConfig(**{name: value})
    assert KVFlowConfig(image_chunks="all", vision_attention="hilberta").image_chunks == "all"


# -- keys ------------------------------------------------------------------------------------
class FakeProcessor:
    """The attributes of transformers' Qwen2VLImageProcessor that decide the patches."""

    do_resize = True
    size = {"shortest_edge": 3136, "longest_edge": 12845056}
    resample = 3
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.48145466, 0.4578275, 0.40821073]
    image_std = [0.26862954, 0.26130258, 0.27577711]
    do_convert_rgb = True
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2


class FakeProcessorPil(FakeProcessor):
    pass


def _key(**over):
    fields = dict(model_id="m|bfloat16", namespace="", sink_ids=[151643], digest="d" * 64,
                  settings=processor_settings(FakeProcessor()), encoder="stock", num_tokens=24)
    fields.update(over)
    return image_chunk_key(**fields)


def test_key_changes_with_every_field_and_with_nothing_else():
    base = _key()
    assert base == _key() and len(base) == 64
    variants = dict(model_id="m|float16", namespace="tenant", sink_ids=[1], digest="e" * 64,
                    settings=processor_settings(FakeProcessor(), {"max_pixels": 1003520}),
                    encoder="hilberta(tiles=16)", num_tokens=25)
    keys = {name: _key(**{name: value}) for name, value in variants.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)


def test_key_fields_cannot_spell_each_other():
    # Moving text between adjacent fields changes the key (length-prefixed fields).
    assert _key(model_id="ab", namespace="c") != _key(model_id="a", namespace="bc")
    # No image key equals the text chunk key of the same model/namespace/sink, even for a
    # model id that spells the kind field.
    assert _key() != chunk_key("m|bfloat16", "", [151643], [PAD] * 24)
    assert _key(model_id=IMAGE_CHUNK_KIND) != chunk_key(IMAGE_CHUNK_KIND, "", [151643], [PAD] * 24)


@pytest.mark.parametrize("bad", [dict(digest=""), dict(settings=None), dict(encoder=""),
                                 dict(num_tokens=0), dict(num_tokens=True), dict(num_tokens=2.0)])
def test_key_inputs_are_checked(bad):
    with pytest.raises(ValueError, match="image_chunk_key"):
        _key(**bad)


def test_processor_settings_are_canonical_and_fold_overrides_as_vllm_does():
    p = FakeProcessor()
    assert processor_settings(p) == processor_settings(p, {})
    # min/max pixels overrides are the size's edges, whichever way they are spelled.
    by_pixels = processor_settings(p, {"max_pixels": 1003520, "min_pixels": 3136})
    by_size = processor_settings(p, {"size": {"longest_edge": 1003520}})
    assert by_pixels == by_size != processor_settings(p)
    # Override order does not matter; other overrides are kept by name.
    assert (processor_settings(p, {"a": 1, "max_pixels": 5}) ==
            processor_settings(p, {"max_pixels": 5, "a": 1}) != processor_settings(p, {"max_pixels": 5}))
    # The processor's class is part of it (transformers' PIL and torchvision backends resize
    # differently), and so is every field.
    assert processor_settings(FakeProcessorPil()) != processor_settings(p)
    q = FakeProcessor()
    q.merge_size = 1
    assert processor_settings(q) != processor_settings(p)
    # A mapping of the attributes works too.
    as_map = {"class": "FakeProcessor", **{k: getattr(p, k) for k in dir(FakeProcessor) if not k.startswith("_")}}
    assert processor_settings(as_map) == processor_settings(p)


def test_image_digest_is_of_the_decoded_pixels():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    png = io.BytesIO()
    img.save(png, format="PNG")
    reread = Image.open(io.BytesIO(png.getvalue()))
    assert image_digest(reread) == image_digest(img)       # another file, same pixels
    changed = pixels.copy()
    changed[5, 7, 1] ^= 1
    assert image_digest(Image.fromarray(changed)) != image_digest(img)
    assert image_digest(img.convert("RGBA")) != image_digest(img)
    assert image_digest(img.transpose(Image.Transpose.ROTATE_90)) != image_digest(img)
    # Arrays and tensors by dtype, shape and bytes.
    assert image_digest(pixels) == image_digest(torch.from_numpy(pixels))
    assert image_digest(pixels) != image_digest(pixels.reshape(48, 32, 3))
    assert image_digest(pixels) != image_digest(pixels.astype(np.int16))
    assert len(image_digest(pixels)) == len(hashlib.sha256().hexdigest())
    with pytest.raises(TypeError, match="image_digest takes"):
        image_digest(b"\x89PNG")

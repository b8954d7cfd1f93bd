"""M-RoPE re-rotation (csrc_triton/mrope_load.py) and M-RoPE positions (vision/mrope.py).

  * the torch reference against M-RoPE written out in float64 from its definition:
    rotate at the old (t, h, w) ids, re-rotate by the deltas, compare with rotating at the
    new ids directly (chunked and interleaved sections, neox and GPT-J pairs, partial
    rotary dims, YaRN's magnitude factor, any delta sign, per-axis deltas);
  * equal deltas on the three axes are the 1-D re-rotation of chunk_load;
  * the positions of a prompt with images, and that moving a chunk shifts its three ids
    by one delta;
  * the Triton kernel under TRITON_INTERPRET=1 against the reference, in a child pytest
    (tests named test_interp_*; interpreter_child.py says why).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vllm_kvflow.kernels.chunk_load as cl
import vllm_kvflow.kernels.mrope_load as ml
from interpreter_child import require_interpreter_child, run_interpreter_child
from test_kernels_interpret import cos_sin_cache, inv_freq, make_cache, rel_err, views
from vllm_kvflow.vision.mrope import (ImagePlacement, isolated_positions, mrope_positions,
                                     position_deltas)

QWEN25_SECTION = [16, 24, 24]  # Qwen2.5-VL-7B: head_dim 128, rotary over all of it


def axes_by_definition(section, interleaved):
    """The axis of each frequency, built differently from the module: chunked = the
    sections laid end to end; interleaved = every frequency on t, then every third from
    1 (h) and from 2 (w) reassigned up to 3 * its section."""
    if not interleaved:
        return np.repeat([0, 1, 2], section)
    axis = np.zeros(sum(section), dtype=np.int64)
    axis[1:3 * section[1]:3] = 1
    axis[2:3 * section[2]:3] = 2
    return axis


def mrope_direct(x, pos, freqs, section, rotary_dim, is_neox, interleaved, mscale=1.0):
    """x [T, H, D] rotated at ids pos [3, T], float64, frequency by frequency."""
    x = x.double()
    out = x.clone()
    axis = axes_by_definition(section, interleaved)
    for i in range(rotary_dim // 2):
        ang = pos[axis[i]].double() * freqs[i]          # [T]
        c, s = (ang.cos() * mscale)[:, None], (ang.sin() * mscale)[:, None]
        a, b = (i, i + rotary_dim // 2) if is_neox else (2 * i, 2 * i + 1)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def test_frequency_axes_match_the_definition():
    for section in ([16, 24, 24], [8, 12, 12], [24, 20, 20], [5, 0, 3]):
        for inter in (False, True):
            got = ml.frequency_axes(section, inter).numpy()
            assert np.array_equal(got, axes_by_definition(section, inter)), (section, inter)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim,head_dim,section,scaling", [
    (128, 128, QWEN25_SECTION, "plain"),     # Qwen2.5-VL-7B's text layers
    (64, 80, [8, 12, 12], "yarn_mscale"),     # partial rotary, a magnitude factor
    (32, 32, [6, 5, 5], "plain"),             # sections of unequal sizes
])
def test_rerotation_equals_mrope_at_new_positions(is_neox, interleaved, rotary_dim, head_dim,
                                                  section, scaling):
    torch.manual_seed(0)
    T, H = 48, 2
    mscale = 1.3 if scaling == "yarn_mscale" else 1.0
    freqs = inv_freq(rotary_dim, base=1e6)
    cache = cos_sin_cache(2048, freqs, mscale)
    raw = torch.randn(T, H, head_dim, dtype=torch.float64)
    old = torch.randint(0, 1000, (3, T))
    new = torch.randint(0, 1000, (3, T))   # independent per axis: the general case
    new[:, :4] = old[:, :4]                 # zero deltas too
    k_old = mrope_direct(raw, old, freqs, section, rotary_dim, is_neox, interleaved, mscale)
    k_new = mrope_direct(raw, new, freqs, section, rotary_dim, is_neox, interleaved, mscale)
    deltas = (new - old).T.contiguous()
    assert deltas.min() < 0 < deltas.max()
    got = ml.rotate_keys_mrope_reference(k_old, deltas, cache, rotary_dim, is_neox, section,
                                         interleaved)
    assert got.dtype == torch.float64
    assert rel_err(got, k_new) < 1e-12
    if rotary_dim < head_dim:
        assert torch.equal(got[..., rotary_dim:], k_old[..., rotary_dim:])


@pytest.mark.parametrize("is_neox", [True, False])
def test_image_moved_in_a_prompt_rotates_to_its_prompt_positions(is_neox):
    """An image computed behind a 3-token sink, then placed after 40 text tokens and
    another image: its keys re-rotated by the position deltas equal keys rotated at its
    ids in the prompt, and the deltas are one number on every axis and token."""
    torch.manual_seed(1)
    sink, grid = 3, (1, 4, 6)
    first = ImagePlacement(10, 1, 5, 3)
    moved = ImagePlacement(40, *grid)
    n = 40 + moved.num_tokens + 7
    prompt = mrope_positions(n, [moved, first])
    old = isolated_positions(sink, moved.num_tokens, moved)
    new = prompt[:, moved.offset:moved.offset + moved.num_tokens]
    deltas = position_deltas(new, old)
    # text at 0..9, the first image from 10 (extent 5), text from 15 for tokens 25..39:
    # the moved image's base is 30 in the prompt, 3 (the sink) alone.
    assert (deltas == 30 - sink).all()
    freqs = inv_freq(128, base=1e6)
    cache = cos_sin_cache(1024, freqs)
    raw = torch.randn(moved.num_tokens, 2, 128, dtype=torch.float64)
    k_old = mrope_direct(raw, torch.from_numpy(old), freqs, QWEN25_SECTION, 128, is_neox, False)
    k_new = mrope_direct(raw, torch.from_numpy(new), freqs, QWEN25_SECTION, 128, is_neox, False)
    got = ml.rotate_keys_mrope_reference(k_old, torch.from_numpy(deltas), cache, 128, is_neox,
                                         QWEN25_SECTION)
    assert rel_err(got, k_new) < 1e-12
    # And moving back (negative delta) undoes it.
    back = ml.rotate_keys_mrope_reference(got, torch.from_numpy(-deltas), cache, 128, is_neox,
                                          QWEN25_SECTION)
    assert rel_err(back, k_old) < 1e-12


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_equal_deltas_are_the_one_dimensional_rerotation(is_neox, interleaved):
    torch.manual_seed(2)
    T = 33
    cache = cos_sin_cache(600, inv_freq(64)).float()
    k = torch.randn(T, 3, 80)
    d = torch.randint(-500, 500, (T,))
    got = ml.rotate_keys_mrope_reference(k, d[:, None].expand(T, 3), cache, 64, is_neox,
                                         [8, 12, 12], interleaved)
    exp = cl.rotate_keys_reference(k, d, cache, 64, is_neox)
    assert torch.equal(got, exp)


def test_prompt_positions_follow_the_rule():
    img = ImagePlacement(2, 1, 2, 3)  # 6 tokens at 2..7
    pos = mrope_positions(11, [img])
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6                      # t: one frame
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]           # h: rows
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]           # w: columns
    assert pos[:, 8:].tolist() == [[5, 6, 7]] * 3               # after: base + max(1,2,3)
    assert isolated_positions(2, 4).tolist() == [[2, 3, 4, 5]] * 3
    with pytest.raises(ValueError, match="overlaps"):
        mrope_positions(8, [img, ImagePlacement(5, 1, 1, 1)])
    with pytest.raises(ValueError, match="leaves"):
        mrope_positions(7, [img])
    with pytest.raises(ValueError, match="its 6 tokens"):
        isolated_positions(1, 5, img)


@pytest.mark.parametrize("layout", ["flash", "cpu"])
def test_load_reference_writes_rotated_keys_and_skips_slots(layout):
    torch.manual_seed(3)
    T, H, D, r, NB, BS = 23, 2, 64, 64, 5, 8
    cache = cos_sin_cache(400, inv_freq(r)).float()
    kv, kc, vc = make_cache(layout, NB, BS, H, D)
    before = kv.clone()
    k_src, v_src = torch.randn(T, H, D), torch.randn(T, H, D)
    slots = torch.randperm(NB * BS)[:T]
    slots[[1, 9]] = -1
    deltas = torch.randint(-300, 300, (T, 3))
    ml.load_chunk_kv_mrope_reference(k_src, v_src, kc, vc, slots, deltas, cache, r, True,
                                     [8, 12, 12])
    exp = ml.rotate_keys_mrope_reference(k_src, deltas, cache, r, True, [8, 12, 12])
    kb, vb = views(layout, before, D)
    written = torch.zeros(NB * BS, dtype=torch.bool)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        written[s] = True
        assert torch.equal(kc[s // BS, s % BS], exp[t])
        assert torch.equal(vc[s // BS, s % BS], v_src[t])
    untouched = ~written.view(NB, BS)
    assert torch.equal(kc[untouched], kb[untouched]) and torch.equal(vc[untouched], vb[untouched])


def test_inputs_are_checked():
    k = torch.randn(4, 2, 16)
    kv, kc, vc = make_cache("flash", 2, 4, 2, 16)
    cache = cos_sin_cache(8, inv_freq(16)).float()
    slots, deltas = torch.arange(4), torch.zeros(4, 3, dtype=torch.int64)
    load = ml.load_chunk_kv_mrope_reference
    with pytest.raises(ValueError, match="sum to rotary_dim / 2 = 8"):
        load(k, k, kc, vc, slots, deltas, cache, 16, True, [2, 3, 4])
    with pytest.raises(ValueError, match="three integers"):
        load(k, k, kc, vc, slots, deltas, cache, 16, True, [4, 4])
    with pytest.raises(ValueError, match="three integers"):
        load(k, k, kc, vc, slots, deltas, cache, 16, True, [4.0, 2, 2])
    with pytest.raises(ValueError, match=r"\[4, 3\] tensor"):
        load(k, k, kc, vc, slots, deltas[:, :2], cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match=r"\[4, 3\] tensor"):
        load(k, k, kc, vc, slots, deltas[:3], cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match="integer"):
        load(k, k, kc, vc, slots, deltas.float(), cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        load(k, k, kc, vc, slots[:3], deltas, cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match="cos_sin_cache length"):
        load(k, k, kc, vc, slots, deltas + 8, cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match="CUDA"):
        ml.load_chunk_kv_mrope(k, k, kc, vc, slots, deltas, cache, 16, True, [4, 2, 2])
    with pytest.raises(ValueError, match=r"\[L, T, Hkv, D\]"):
        ml.load_chunk_kv_mrope_layers(k, k, [kc], [vc], slots, deltas, cache, 16, True, [4, 2, 2])


# --------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# --------------------------------------------------------------------------------------
def test_kernel_under_triton_interpreter():
    """Run this file's ``test_interp_*`` tests in a TRITON_INTERPRET=1 child pytest."""
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_kernel_under_triton_interpreter")
    return ml


@pytest.mark.parametrize("layout", ["flash", "cpu"])
@pytest.mark.parametrize("is_neox,interleaved", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("rotary_dim,head_dim,section,dtype", [
    (64, 64, [8, 12, 12], torch.float32),
    (48, 80, [8, 8, 8], torch.float16),       # partial rotary, head_dim 80, 16-bit cache
])
def test_interp_kernel_matches_reference(interp, layout, is_neox, interleaved, rotary_dim,
                                         head_dim, section, dtype):
    torch.manual_seed(4)
    T, H, NB, BS = 37, 2, 8, 8  # T not a multiple of BLOCK_T
    cache = cos_sin_cache(300, inv_freq(rotary_dim)).float()
    kv, kc, vc = make_cache(layout, NB, BS, H, head_dim, dtype)
    kv.fill_(float("nan"))  # poison: every written element must be overwritten
    kv_ref = kv.clone()
    kc_ref, vc_ref = views(layout, kv_ref, head_dim)
    k_src = torch.randn(H, T, head_dim).transpose(0, 1)  # non-contiguous source
    v_src = torch.randn(T, H, head_dim)
    slots = torch.randperm(NB * BS)[:T]
    slots[[2, 30]] = -1
    deltas = torch.randint(-250, 250, (3, T)).T            # non-contiguous deltas
    deltas[5] = 0
    interp.load_chunk_kv_mrope(k_src, v_src, kc, vc, slots, deltas, cache, rotary_dim, is_neox,
                               section, interleaved=interleaved)
    interp.load_chunk_kv_mrope_reference(k_src, v_src, kc_ref, vc_ref, slots, deltas, cache,
                                         rotary_dim, is_neox, section, interleaved=interleaved)
    assert torch.equal(kv.isnan(), kv_ref.isnan())
    assert (~kv.isnan()).sum() == 2 * (T - 2) * H * head_dim
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(kv.nan_to_num(0).float(), kv_ref.nan_to_num(0).float(),
                               atol=tol, rtol=tol)


def test_interp_multi_layer_load(interp):
    """One launch over three layers whose caches are separate allocations."""
    torch.manual_seed(6)
    L, T, H, D, NB, BS = 3, 21, 2, 32, 6, 8
    cache = cos_sin_cache(300, inv_freq(D)).float()
    layers = [make_cache("flash", NB, BS, H, D) for _ in range(L)]
    refs = [make_cache("flash", NB, BS, H, D) for _ in range(L)]
    for (kv, _, _), (ref, _, _) in zip(layers, refs):
        kv.fill_(float("nan"))
        ref.fill_(float("nan"))
    k_src = torch.randn(L, T, H, D)
    v_src = torch.randn(L, H, T, D).transpose(1, 2)
    slots = torch.randperm(NB * BS)[:T]
    deltas = torch.randint(-250, 250, (T, 3), dtype=torch.int32)
    interp.load_chunk_kv_mrope_layers(k_src, v_src, [c[1] for c in layers],
                                      [c[2] for c in layers], slots, deltas, cache, D, False,
                                      [6, 5, 5])
    for i, (kv, _, _) in enumerate(layers):
        ref, kc_ref, vc_ref = refs[i]
        interp.load_chunk_kv_mrope_reference(k_src[i], v_src[i], kc_ref, vc_ref, slots, deltas,
                                             cache, D, False, [6, 5, 5])
        assert torch.equal(kv.isnan(), ref.isnan())
        torch.testing.assert_close(kv.nan_to_num(0), ref.nan_to_num(0), atol=1e-6, rtol=0)

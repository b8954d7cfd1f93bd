"""The GPU benchmark's images and patch layout (patches/vision_encoder.py), on CPU: every
patch row holds the pixels of the patch the encoder's order says it is; images resize to
the grids the benchmark names. And, read from vLLM 0.26's staged source (skipped where it
is not unpacked), the names and signatures the encoder build and the HilbertA swap call:
the build has never run off the GPU machine, so a renamed argument would cost a GPU run."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from vllm_kvflow.patches import vision_encoder
from vllm_kvflow.patches.vision_encoder import image_patches, make_image, patchify


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


@pytest.mark.parametrize("hw,grid", [((1024, 1024), (74, 74)), ((2048, 2048), (146, 146)),
                                     ((700, 1300), (50, 92)), ((448, 616), (32, 44))])
def test_images_resize_to_the_benchmarks_grids(hw, grid):
    pixels, grid_thw = image_patches(make_image("gradient", *hw))
    assert grid_thw.tolist() == [[1, *grid]]
    assert pixels.shape == (grid[0] * grid[1], 3 * 2 * 14 * 14) and pixels.dtype == torch.float32


@pytest.mark.parametrize("hw", [(1024, 1024), (2048, 2048), (700, 1300), (30, 5000), (9000, 9000)])
def test_the_written_out_resize_rule_is_transformers(hw):
    """The fallback (no torchvision) against transformers' torchvision-free twin."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    kw = dict(factor=28, min_pixels=56 * 56, max_pixels=vision_encoder.MAX_PIXELS)
    assert vision_encoder._smart_resize_rule(*hw, **kw) == pil.smart_resize(*hw, **kw)


# -- vLLM 0.26's source, read (not imported) ---------------------------------------------------
def _staged_vllm() -> Path | None:
    candidates = [os.environ.get("KVFLOW_VLLM026_SRC"), Path.home() / "site/vllm",
                  Path.home() / ".cache/kvflow-gpu-build/site/vllm"]
    for c in candidates:
        if c and (Path(c) / "model_executor/models/qwen2_5_vl.py").is_file():
            version = (Path(c) / "_version.py")
            if version.is_file() and "0.26" in version.read_text():
                return Path(c)
    return None


VLLM = _staged_vllm()
needs_staged = pytest.mark.skipif(VLLM is None, reason="vLLM 0.26's source is not unpacked here")


def _tree(rel: str) -> ast.Module:
    return ast.parse((VLLM / rel).read_text())


def _def(tree, *path):
    node = tree
    for name in path:
        node = next(n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                    and n.name == name)
    return node


def _params(fn) -> tuple[list[str], list[str]]:
    return [a.arg for a in fn.args.args], [a.arg for a in fn.args.kwonlyargs]


def _self_attrs(fn) -> set[str]:
    return {t.attr for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


@needs_staged
def test_the_encoder_class_as_the_build_and_the_swap_call_it():
    tree = _tree("model_executor/models/qwen2_5_vl.py")
    enc = _def(tree, "Qwen2_5_VisionTransformer")
    assert _params(_def(enc, "__init__"))[0] == ["self", "vision_config", "norm_eps", "quant_config", "prefix"]
    assert _params(_def(enc, "forward")) == (["self", "x", "grid_thw"], ["encoder_metadata"])
    assert _params(_def(enc, "get_window_index_thw"))[0] == ["self", "grid_t", "grid_h", "grid_w"]
    assert {"blocks", "fullatt_block_indexes", "window_size", "patch_size", "spatial_merge_size",
            "attn_backend", "num_heads", "hidden_size"} <= _self_attrs(_def(enc, "__init__"))
    # block i's op is blocks[i].attn.attn, called with keywords only
    attn = _def(tree, "Qwen2_5_VisionAttention")
    assert "attn" in _self_attrs(_def(attn, "__init__"))
    calls = [n for n in ast.walk(_def(attn, "forward")) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "attn"]
    assert len(calls) == 1 and not calls[0].args
    assert [k.arg for k in calls[0].keywords] == ["query", "key", "value", "cu_seqlens",
                                                  "max_seqlen", "sequence_lengths"]


@needs_staged
def test_the_attention_op_as_the_swap_and_the_build_use_it():
    cls = _def(_tree("model_executor/layers/attention/mm_encoder_attention.py"), "MMEncoderAttention")
    assert {"scale", "attn_backend", "_fa_version"} <= _self_attrs(_def(cls, "__init__"))
    assert "fp8_enabled" in _self_attrs(_def(cls, "_init_fp8_state"))
    assert _params(_def(cls, "process_weights_after_loading"))[0] == ["self", "act_dtype"]
    assert _def(_tree("model_executor/layers/quantization/base_config.py"), "QuantizeMethodBase")


@needs_staged
def test_the_setup_calls_of_the_build():
    ps = _tree("distributed/parallel_state.py")
    init_args = _params(_def(ps, "init_distributed_environment"))[0]
    assert {"world_size", "rank", "local_rank", "backend", "distributed_init_method"} <= set(init_args)
    assert _params(_def(ps, "initialize_model_parallel"))[0][:2] == [
        "tensor_model_parallel_size", "pipeline_model_parallel_size"]
    assert _def(ps, "model_parallel_is_initialized")
    assert any(isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == "_WORLD" for n in ps.body)
    assert _def(_tree("config/vllm.py"), "set_current_vllm_config")
    assert _def(_tree("config/kernel.py"), "IrOpPriorityConfig", "set_default")
    assert _def(_tree("ir/op.py"), "set_default_torch_wrap")
    assert "from .op import" in (VLLM / "ir/__init__.py").read_text()
    compilation = (VLLM / "config/compilation.py").read_text()
    for field in ("compile_mm_encoder: bool = False", "ir_enable_torch_wrap: bool", "cudagraph_mm_encoder"):
        assert field in compilation
    # a block that is not compiled is called as self.forward (no module hooks on blocks)
    decorators = (VLLM / "compilation/decorators.py").read_text()
    assert "self.do_not_compile = (" in decorators
    assert "if self.do_not_compile or torch.compiler.is_compiling():\n            return self.forward(" in decorators

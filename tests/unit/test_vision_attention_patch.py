"""patches/vision_attention.py on a stand-in of vLLM 0.26's Qwen2.5-VL vision encoder
(tests/unit/qwen_vision_standin.py: vLLM's real module needs torchvision to import).

The stand-in reorders units into windows, attends per window in its windowed blocks and
per frame in its full ones, and undoes the order, so a wrong composition of the Hilbert
layout with the window order would change its output."""
from __future__ import annotations

import ast
import importlib.util
import inspect
import logging
import types
from pathlib import Path

import pytest
import torch

from qwen_vision_standin import Qwen2_5_VisionTransformer
from vllm_kvflow.patches import vision_attention as va
from vllm_kvflow.plugin import CONNECTOR_MODULE, CONNECTOR_NAME
from vllm_kvflow.vision.encoder_attention import HilbertASettings, HilbertEncoderAttention

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread

SMALL = HilbertASettings(tiles=3, central_fraction=0.25, cycle=4, min_tokens=64)
GRID = [[1, 16, 20], [1, 6, 6], [2, 12, 10]]  # HilbertA frames, a dense one, two frames


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = Qwen2_5_VisionTransformer()
    for p in enc.parameters():  # large enough for attention to be far from uniform
        torch.nn.init.normal_(p, std=0.3)
    return enc.eval()


def _inputs(seed=1):
    n = sum(t * h * w for t, h, w in GRID)
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_one_tile_no_centre_reproduces_the_stock_encoder():
    enc, x = _encoder(), _inputs()
    stock = enc(x, GRID)
    va.enable(enc, HilbertASettings(tiles=1, central_fraction=0.0, min_tokens=1), kernel="sdpa")
    assert rel(enc(x, GRID), stock) < 1e-5


@torch.no_grad()
def test_hilberta_encoder_equals_the_masked_dense_reference_and_differs_from_stock():
    enc, x = _encoder(), _inputs()
    stock = enc(x, GRID)
    va.enable(enc, SMALL, kernel="sdpa")
    sparse = enc(x, GRID)
    va.disable(enc)
    va.enable(enc, SMALL, kernel="reference")   # dense float32 under the HilbertA mask
    reference = enc(x, GRID)
    assert rel(sparse, reference) < 1e-5
    assert rel(sparse, stock) > 1e-3


@torch.no_grad()
def test_only_full_attention_blocks_are_swapped_and_disable_restores():
    enc, x = _encoder(), _inputs()
    stock = enc(x, GRID)
    ops = [b.attn.attn for b in enc.blocks]
    ctx = va.enable(enc, SMALL, kernel="sdpa")
    assert va.enable(enc, SMALL) is ctx                       # idempotent
    swapped = {i: b.attn.attn for i, b in enumerate(enc.blocks)
               if isinstance(b.attn.attn, HilbertEncoderAttention)}
    assert sorted(swapped) == [1, 3, 5]
    assert [swapped[i].ordinal for i in (1, 3, 5)] == [0, 1, 2]  # the sliding schedule's k
    assert all(swapped[i].stock is ops[i] for i in swapped)
    # the model's parameter names are unchanged (weights load by name)
    assert {n for n, _ in enc.named_parameters()} == {n for n, _ in _encoder().named_parameters()}
    calls = [op.calls for op in ops]
    enc(x, GRID)
    assert [op.calls - c for op, c in zip(ops, calls)] == [1, 0, 1, 0, 1, 0]  # windowed: stock
    va.disable(enc)
    assert [b.attn.attn for b in enc.blocks] == ops and "forward" not in enc.__dict__
    assert torch.equal(enc(x, GRID), stock)


def test_enable_keeps_its_settings_loudly_and_disable_undoes_a_partial_swap(caplog):
    enc = _encoder()
    ops = [b.attn.attn for b in enc.blocks]
    ctx = va.enable(enc, SMALL, kernel="sdpa")
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow"):
        assert va.enable(enc, HilbertASettings(tiles=5), kernel="sdpa") is ctx
    assert "already on" in caplog.text and ctx.settings == SMALL
    va.disable(enc)
    # an enable that raised after swapping one block: disable still restores it
    enc.blocks[3].attn.attn = HilbertEncoderAttention(ops[3], 0, ctx, ops[3].scale)
    va.disable(enc)
    assert [b.attn.attn for b in enc.blocks] == ops and "forward" not in vars(enc)


@torch.no_grad()
def test_the_window_order_comes_from_the_encoder_itself():
    enc, x = _encoder(), _inputs()
    va.enable(enc, SMALL, kernel="sdpa")
    before = enc.get_window_index_calls
    enc(x, GRID)
    enc(x, GRID)
    # once per item by the stand-in's forward each call, plus once per item for the plans
    # (cached for the second call)
    assert enc.get_window_index_calls - before == 2 * len(GRID) + len(GRID)


@torch.no_grad()
def test_a_forward_without_grid_runs_the_stock_op_and_warns(caplog):
    enc, x = _encoder(), _inputs()
    stock = enc(x, GRID)
    va.enable(enc, SMALL, kernel="sdpa")
    with caplog.at_level(logging.WARNING, logger="vllm_kvflow"):
        out = enc(x, None, encoder_metadata={"grid_thw": GRID})
    assert torch.equal(out, stock)
    assert "grid_thw" in caplog.text


def test_compiled_or_unknown_encoders_are_refused():
    enc = _encoder()
    enc.blocks[3].do_not_compile = False   # what vLLM's compile decorator sets when it compiles
    with pytest.raises(ValueError, match="compile_mm_encoder"):
        va.enable(enc, SMALL)

    enc = _encoder()
    enc.blocks[5].attn.attn.fp8_enabled = True
    with pytest.raises(ValueError, match="fp8"):
        va.enable(enc, SMALL)

    class OtherEncoder(torch.nn.Module):
        blocks = []

    with pytest.raises(TypeError, match="no recipe for vision encoder OtherEncoder"):
        va.enable(OtherEncoder())


def _config(mode=None, connector=CONNECTOR_NAME, module_path=None):
    extra = {} if mode is None else {"vision_attention": mode}
    kvt = types.SimpleNamespace(kv_connector=connector, kv_connector_module_path=module_path,
                                kv_connector_extra_config=extra)
    return types.SimpleNamespace(kv_transfer_config=kvt,
                                 compilation_config=types.SimpleNamespace(cudagraph_mm_encoder=False))


def test_the_setting_is_read_from_the_kvflow_connector_only():
    assert va.configured_mode(None) == "stock"
    assert va.configured_mode(types.SimpleNamespace(kv_transfer_config=None)) == "stock"
    assert va.configured_mode(_config()) == "stock"
    assert va.configured_mode(_config("hilberta")) == "hilberta"
    assert va.configured_mode(_config("hilberta", connector=None, module_path=CONNECTOR_MODULE)) == "hilberta"
    assert va.configured_mode(_config("hilberta", connector="OtherConnector")) == "stock"
    with pytest.raises(ValueError, match="vision_attention must be one of"):
        va.configured_mode(_config("flash"))


@torch.no_grad()
def test_encoders_built_with_the_setting_on_get_hilberta(monkeypatch):
    """The import hook's patch on a module holding the class: construction under a config
    with vision_attention 'hilberta' swaps the blocks; 'stock' leaves them."""
    module = types.ModuleType("standin_qwen2_5_vl")

    class Qwen2_5_VisionTransformerCopy(Qwen2_5_VisionTransformer):
        pass

    Qwen2_5_VisionTransformerCopy.__name__ = "Qwen2_5_VisionTransformer"
    module.Qwen2_5_VisionTransformer = Qwen2_5_VisionTransformerCopy
    family = va.FAMILIES[0]
    patch = va._wrap_init(family)
    patch(module)
    patch(module)  # a second install is a no-op
    config = _config("hilberta")
    monkeypatch.setattr(va, "_current_vllm_config", lambda: config)
    enc = module.Qwen2_5_VisionTransformer()
    assert sum(isinstance(b.attn.attn, HilbertEncoderAttention) for b in enc.blocks) == 3
    assert enc._kvflow_hilberta.settings == HilbertASettings()   # the defaults
    config = _config("stock")
    enc = module.Qwen2_5_VisionTransformer()
    assert not any(isinstance(b.attn.attn, HilbertEncoderAttention) for b in enc.blocks)


def _vllm_sources() -> list[Path]:
    """vLLM source trees to read: vLLM 0.26 where it is unpacked (the GPU machine's
    $HOME/site, this machine's build cache, KVFLOW_VLLM026_SRC) and the installed vLLM."""
    import os

    roots = [os.environ.get("KVFLOW_VLLM026_SRC"), Path.home() / "site/vllm",
             Path.home() / ".cache/kvflow-gpu-build/site/vllm"]
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent)
    found = []
    for root in roots:
        if root and (Path(root) / "model_executor/layers/attention/mm_encoder_attention.py").is_file():
            if Path(root).resolve() not in [f.resolve() for f in found]:
                found.append(Path(root))
    return found


def test_drop_in_has_the_op_signature_of_vllm():
    """vLLM 0.26's MMEncoderAttention.forward_native / forward_cuda take (query, key, value,
    cu_seqlens, max_seqlen, sequence_lengths); so do the staged 0.26's and the installed
    vLLM's (read from their source, without importing vLLM)."""
    names = ["self", "query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths"]
    assert list(inspect.signature(HilbertEncoderAttention.forward).parameters) == names
    roots = _vllm_sources()
    if not roots:
        pytest.skip("no vLLM source here")
    for root in roots:
        path = root / "model_executor/layers/attention/mm_encoder_attention.py"
        tree = ast.parse(path.read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MMEncoderAttention")
        forwards = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("forward_")]
        assert {"forward_native", "forward_cuda"} <= {fn.name for fn in forwards}, path
        for fn in forwards:
            assert [a.arg for a in fn.args.args] == names, (path, fn.name)

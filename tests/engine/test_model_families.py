"""The executor on the Qwen2, Qwen3 (q_norm/k_norm) and Mistral decoder layers, through
the real vLLM engine. Only SmolLM2 has real weights here, so each family is a tiny local
config (SmolLM2's tokenizer) with load_format="dummy" weights.

vLLM keeps per-process globals (the KV-connector agent, the recorded model), so a second
engine cannot live next to the session's SmolLM2 engine: each family runs in a child
pytest (KVFLOW_FAMILY set) that builds its own engine and runs the `child_common_` tests
and the family's own `child_<family>_` tests, with the conftest fixtures bound to it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exactness import (LOGPROB_TOL, assert_all_recomputed, assert_identical, candidate_tokens,
                       first_logprob, make_items, run_pair, run_rag)
from vllm_kvflow.request import STATS_KEY

pytestmark = pytest.mark.engine

FAMILY = os.environ.get("KVFLOW_FAMILY")  # set only inside a family's child pytest
_REPO = Path(__file__).resolve().parents[2]

# Tiny decoders: GQA (4 query heads, 2 KV heads), head_dim 64; the vocabulary is
# SmolLM2's, whose tokenizer files are copied next to each config. Untied embeddings:
# with random tied ones the model tends to echo its last token whatever the context.
_COMMON = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=49152, max_position_embeddings=4096,
    rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    dtype="float32",
)
CONFIGS = {
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  use_sliding_window=False, sliding_window=None),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                  use_sliding_window=False, sliding_window=None),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")

in_child = pytest.mark.skipif(FAMILY is None, reason="runs inside a family's child pytest")


# -- parent: one child pytest per family ---------------------------------------------------

@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family(family):
    if FAMILY is not None:
        pytest.skip("inside a family's child pytest")
    # A small fixed KV cache: the default share of RAM is far more than 4K tokens need.
    env = dict(os.environ, KVFLOW_FAMILY=family, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
           "-k", f"child_common_ or child_{family}_"]
    res = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"{family} child failed:\n{tail}"
    last = res.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "deselected" in last, tail


# -- child: the family's engine -----------------------------------------------------------

def _load_seeded_weights(loader, model, model_config):
    """Replaces DummyModelLoader.load_weights. vLLM's dummy weights are U(-1e-3, 1e-3),
    every tensor from the same seed: logits and attention come out near-uniform, so
    neither greedy tokens nor a wrong position or norm would show. Draw instead, from one
    seeded stream, matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2) and biases
    ~ N(0, 0.1^2) (large biases make every position look alike)."""
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():  # buffers (RoPE tables) stay as built
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim >= 2:
            values = noise / param.shape[-1] ** 0.5
        elif name.endswith("bias"):
            values = 0.1 * noise
        else:
            values = 1 + 0.1 * noise
        param.data.copy_(values.to(param.dtype))


def _write_model_dir(root: Path, family: str) -> Path:
    from vllm_kvflow.model import default_model_path

    target = root / family
    target.mkdir()
    (target / "config.json").write_text(json.dumps({**_COMMON, **CONFIGS[family]}, indent=1))
    source = default_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="session")
def llm(tmp_path_factory):
    """Overrides conftest's SmolLM2 engine for this module (child only)."""
    from vllm import LLM
    from vllm.model_executor.model_loader import dummy_loader

    import vllm_kvflow

    model_dir = _write_model_dir(tmp_path_factory.mktemp("families"), FAMILY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dummy_loader.DummyModelLoader, "load_weights", _load_seeded_weights)
        # Eager: torch.compile would take most of the start-up on 2 cores, and the
        # compiled path is covered by the SmolLM2 tests.
        engine = LLM(str(model_dir), load_format="dummy", dtype="float32", max_model_len=4096,
                     enable_prefix_caching=False, distributed_executor_backend="uni", seed=0,
                     kv_cache_memory_bytes=256 << 20, enforce_eager=True,
                     kv_transfer_config=vllm_kvflow.transfer_config(method="none",
                                                                    store_capacity_gb=0.5))
    yield engine
    del engine


@in_child
def test_child_common_architecture(worker):
    model = worker._ready().adapter.model
    assert type(model).__name__ == CONFIGS[FAMILY]["architectures"][0]


@in_child
def test_child_common_ratio_one_reproduces_full_prefill(generate, tokenizer):
    items = make_items(2, seed=21, passages=4)
    outs_full, outs_kv, prompts = run_pair(generate, tokenizer, items, method="infoflow", ratio=1.0)
    assert_all_recomputed(outs_kv, prompts)
    assert_identical(outs_full, outs_kv)
    # The check has teeth: answers depend on the prompt, and reuse without recompute
    # (same chunks, now store hits) changes them.
    assert len({tuple(out.outputs[0].token_ids) for out in outs_full}) == len(outs_full)
    outs_none, _ = run_rag(generate, tokenizer, items, method="none", ratio=0.0)
    for f, n in zip(outs_full, outs_none):
        assert n.outputs[0].token_ids != f.outputs[0].token_ids


@in_child
def test_child_common_infoflow_at_015_recomputes_15_percent(generate, tokenizer):
    outs, prompts = run_rag(generate, tokenizer, make_items(2, seed=22, passages=4), max_tokens=1,
                            method="infoflow", ratio=0.15)
    for out, prompt in zip(outs, prompts):
        stats = out.kv_transfer_params[STATS_KEY]
        chunk_tokens = sum(e - s for s, e in prompt.chunk_spans)
        assert stats["fallback"] is None and "error" not in stats, stats
        assert stats["method"] == "infoflow" and stats["tokens_reused"] == chunk_tokens
        # No chunk follows the sink: every chunk and separator token is a candidate.
        assert stats["candidate_tokens"] == candidate_tokens(prompt)
        assert stats["tokens_recomputed"] == int(0.15 * candidate_tokens(prompt) + 1e-9) > 0


@in_child
@pytest.mark.skipif(FAMILY != "qwen3", reason="q_norm/k_norm are Qwen3's")
def test_child_qwen3_exactness_needs_qk_norm(generate, tokenizer, worker, monkeypatch):
    """The executor applies Qwen3's q_norm/k_norm: with them skipped in the executor only
    (vLLM's full prefill keeps them), ratio 1.0 no longer reproduces full prefill."""
    adapter = worker._ready().adapter
    layer_forward = adapter.layer_forward

    def without_qk_norm(idx, *args):
        # Plain assignment: monkeypatch cannot restore an nn.Module's submodules.
        attn = adapter.layers[idx].self_attn
        q_norm, k_norm = attn.q_norm, attn.k_norm
        attn.q_norm = attn.k_norm = torch.nn.Identity()
        try:
            return layer_forward(idx, *args)
        finally:
            attn.q_norm, attn.k_norm = q_norm, k_norm

    monkeypatch.setattr(adapter, "layer_forward", without_qk_norm)
    # Chunks no other test uses: the store keeps what this broken executor computes.
    items = make_items(2, seed=23, passages=4)
    outs_full, outs_kv, prompts = run_pair(generate, tokenizer, items, method="infoflow", ratio=1.0)
    assert_all_recomputed(outs_kv, prompts)
    for f, k in zip(outs_full, outs_kv):
        assert (k.outputs[0].token_ids != f.outputs[0].token_ids
                or abs(first_logprob(k) - first_logprob(f)) > LOGPROB_TOL)

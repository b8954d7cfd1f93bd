"""CPU engines size their KV cache in bytes from what they must hold, never with a
memory fraction, and say in one line what to lower when the machine cannot give it."""
from __future__ import annotations

import json
import sys
import types

import pytest

from vllm_kvflow import kv_memory
from vllm_kvflow.kv_memory import KVCacheTooLarge, cpu_kv_cache_bytes, kv_bytes_per_token

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
           "intermediate_size": 1536, "vocab_size": 49152}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return str(tmp_path)


def test_bytes_per_token_is_layers_heads_head_size_k_and_v_dtype(model_dir):
    assert kv_bytes_per_token(model_dir, "float32") == 30 * 3 * 64 * 2 * 4
    assert kv_bytes_per_token(model_dir, "bfloat16") == 30 * 3 * 64 * 2 * 2


@pytest.mark.parametrize("saved, size", [("bfloat16", 2), ("float32", 4), (None, 4)])
def test_auto_dtype_is_the_checkpoints(tmp_path, saved, size):
    # "auto" must not guess half precision: a float32 checkpoint would get half its cache.
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, **({"torch_dtype": saved} if saved else {})}))
    assert kv_bytes_per_token(str(tmp_path), "auto") == 30 * 3 * 64 * 2 * size


def test_sequences_hold_whole_blocks_of_max_model_len_plus_the_null_block(model_dir, monkeypatch):
    monkeypatch.setattr(kv_memory, "available_bytes", lambda: 1 << 40)
    per_token = 30 * 3 * 64 * 2 * 4
    assert cpu_kv_cache_bytes(model_dir, 8192, 1, "float32") == (8192 + 128) * per_token
    assert cpu_kv_cache_bytes(model_dir, 1000, 3, "float32") == (1024 * 3 + 128) * per_token


def test_too_large_says_needed_available_and_the_flag_in_one_line(model_dir, monkeypatch):
    monkeypatch.setattr(kv_memory, "available_bytes", lambda: 200 << 20)
    with pytest.raises(KVCacheTooLarge) as e:
        cpu_kv_cache_bytes(model_dir, 8192, 1, "float32", lower_with="--max-model-len")
    msg = str(e.value)
    assert "\n" not in msg and "0.36 GiB" in msg and "0.20 GiB" in msg and "--max-model-len" in msg


def test_available_memory_is_read_from_this_machine():
    have = kv_memory.available_bytes()
    assert have is None or have > 0


def _capture_llm_kwargs(monkeypatch) -> dict:
    """make_llm with vllm.LLM replaced by a recorder, on the CPU platform."""
    seen: dict = {}
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = lambda model, **kwargs: seen.update(model=model, **kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return seen


def test_cpu_engine_builder_asks_bytes_not_a_fraction(model_dir, monkeypatch):
    from vllm_kvflow.bench.engine import make_llm

    monkeypatch.setattr(kv_memory, "available_bytes", lambda: 1 << 40)
    seen = _capture_llm_kwargs(monkeypatch)
    make_llm(model_dir, max_model_len=4096, num_seqs=2, connector=False)
    assert "gpu_memory_utilization" not in seen
    assert seen["kv_cache_memory_bytes"] == (4096 * 2 + 128) * kv_bytes_per_token(model_dir, "float32")


def test_cpu_server_flags_ask_bytes_not_a_fraction(model_dir, monkeypatch):
    from vllm_kvflow.server import cpu_server_args

    monkeypatch.setattr(kv_memory, "available_bytes", lambda: 1 << 40)
    args = cpu_server_args(model_dir, 1024, 8)
    assert not any("memory-utilization" in a for a in args)
    i = args.index("--kv-cache-memory-bytes")
    assert int(args[i + 1]) == (1024 * 8 + 128) * kv_bytes_per_token(model_dir, "float32")

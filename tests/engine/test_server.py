"""The OpenAI-compatible server with the plugin: the connector is found by name, chunk
texts in a chat request are located in the rendered prompt, stats come back."""
from __future__ import annotations

import json
import urllib.request

import pytest

import vllm_kvflow
from vllm_kvflow.server import ServerProcess, cpu_server_args

pytestmark = pytest.mark.engine


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    config = vllm_kvflow.transfer_config(method="infoflow", recompute_ratio=0.15)
    log = tmp_path_factory.mktemp("server") / "server.log"
    # Prefix caching on, as `vllm serve` defaults.
    with ServerProcess(model_path, log, config,
                       cpu_server_args(model_path, 2048, 4)) as srv:
        yield srv.base_url


def test_chat_request_with_chunk_texts(server, model_path):
    passages = ["Zorbia\nThe capital of Zorbia is Quellport, a harbor city.",
                "Mirevale\nThe mayor of Mirevale is Ada Finch."]
    content = "\n\n".join(passages) + "\n\nQuestion: What is the capital of Zorbia?"
    body = {"model": model_path, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    full = _post(server + "/v1/chat/completions",
                 {**body, "kv_transfer_params": {"kvflow": {"chunks": [{"text": p} for p in passages],
                                                            "method": "full"}}})
    reuse = _post(server + "/v1/chat/completions",
                  {**body, "kv_transfer_params": {"kvflow": {"chunks": [{"text": p} for p in passages],
                                                             "ratio": 1.0}}})
    stats = reuse["kv_transfer_params"]["kvflow_stats"]
    assert stats["fallback"] is None and stats["chunks_unlocatable"] == []
    assert stats["chunks"] == 2 and stats["tokens_reused"] == stats["chunk_tokens"] > 0
    # ratio 1.0 recomputes every candidate: the chunks and the separator between them
    assert stats["tokens_recomputed"] == stats["candidate_tokens"] > stats["chunk_tokens"]
    # ratio 1.0 through the server reproduces full prefill's greedy answer
    assert reuse["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]


def test_bad_declaration_gets_full_prefill_with_reason(server, model_path):
    out = _post(server + "/v1/completions",
                {"model": model_path, "prompt": "Tolm exports copper. What does Tolm export?",
                 "max_tokens": 4, "kv_transfer_params": {"kvflow": {"chunks": [{"span": [5, 2]}]}}})
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert stats["fallback"] == "bad-request" and "span" in stats["error"]
    assert out["usage"]["completion_tokens"] >= 1  # answered by full prefill


def _first_token_logprobs(server, model_path, prompt, **extra) -> dict[str, float]:
    out = _post(server + "/v1/completions", {"model": model_path, "prompt": prompt, "max_tokens": 1,
                                             "temperature": 0, "logprobs": 5, **extra})
    return out["choices"][0]["logprobs"]["top_logprobs"][0], out.get("kv_transfer_params")


def test_blended_kv_never_served_from_the_exact_prefix_cache(server, model_path):
    # Prompts span several 128-token blocks, so vLLM caches full blocks of each request.
    passages = [f"Archive {i}\nThe archive of Velmar holds {i * 7} ledgers of grain, salt and "
                f"copper trades, sealed by clerk number {i * 13} in the year {1700 + i}." for i in range(12)]
    prompt = "\n\n".join(passages) + "\n\nQuestion: How many ledgers does archive 5 hold?\nAnswer:"
    chunks = {"kvflow": {"chunks": [{"text": p} for p in passages], "method": "none"}}
    blended, params = _first_token_logprobs(server, model_path, prompt, kv_transfer_params=chunks)
    assert params["kvflow_stats"]["tokens_reused"] > 256 and params["kvflow_stats"]["fallback"] is None
    # The same prompt without kvflow, after the blend: must be exact, not a prefix-cache
    # hit on the blended blocks. The reference is computed under its own cache salt.
    plain, _ = _first_token_logprobs(server, model_path, prompt)
    reference, _ = _first_token_logprobs(server, model_path, prompt, cache_salt="reference")
    assert plain.keys() == reference.keys()
    assert max(abs(plain[t] - reference[t]) for t in plain) < 1e-3
    # ...and the blend really differs from exact (else this test could not fail).
    shared = blended.keys() & reference.keys()
    assert shared and max(abs(blended[t] - reference[t]) for t in shared) > 1e-3

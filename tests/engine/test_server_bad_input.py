"""Malformed requests through the real server: each gets a clear HTTP 4xx or a
full-prefill fallback with the reason in its stats, and the server keeps answering
correctly afterwards (same greedy answer as before the bad batch)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import vllm_kvflow
from vllm_kvflow.server import ServerProcess, cpu_server_args

pytestmark = pytest.mark.engine

PASSAGES = ["Zorbia\nThe capital of Zorbia is Quellport, a harbor city.",
            "Mirevale\nThe mayor of Mirevale is Ada Finch."]
PROMPT = "\n\n".join(PASSAGES) + "\n\nQuestion: What is the capital of Zorbia?\nAnswer:"
GOOD = {"chunks": [{"text": p} for p in PASSAGES]}


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(model_path, log, vllm_kvflow.transfer_config(),
                       cpu_server_args(model_path, 512, 16)) as srv:
        yield srv.base_url


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _completion(server, model_path, kv_transfer_params, prompt=PROMPT, **extra):
    body = {"model": model_path, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    if kv_transfer_params is not ...:
        body["kv_transfer_params"] = kv_transfer_params
    return _post(server + "/v1/completions", body)


_answers: dict[str, str] = {}


def test_good_request_before(server, model_path):
    status, out = _completion(server, model_path, {"kvflow": GOOD})
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert status == 200 and stats["fallback"] is None and stats["chunks"] == 2
    _answers["before"] = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 8


def _with(**changes):
    return {"kvflow": {**GOOD, **changes}}


# (id, kv_transfer_params, substring of the reason in the stats' error)
FALLBACKS = [
    ("span-reversed", _with(chunks=[{"span": [5, 2]}]), "span"),
    ("span-negative", _with(chunks=[{"span": [-3, 4]}]), "outside the prompt"),
    ("span-past-prompt", _with(chunks=[{"span": [0, 10**9]}]), "outside the prompt"),
    ("span-empty", _with(chunks=[{"span": [3, 3]}]), "outside the prompt"),
    ("span-strings", _with(chunks=[{"span": ["0", "4"]}]), "integers"),
    ("span-floats", _with(chunks=[{"span": [0.0, 4.5]}]), "integers"),
    ("span-bools", _with(chunks=[{"span": [True, 4]}]), "integers"),
    ("span-three-ints", _with(chunks=[{"span": [0, 4, 8]}]), "[start, end]"),
    ("spans-overlap", _with(chunks=[{"span": [0, 10]}, {"span": [5, 15]}]), "overlap"),
    ("spans-duplicated", _with(chunks=[{"span": [0, 10]}, {"span": [0, 10]}]), "overlap"),
    ("chunks-missing", {"kvflow": {"method": "none"}}, "non-empty list"),
    ("chunks-empty-list", _with(chunks=[]), "non-empty list"),
    ("chunks-not-a-list", _with(chunks="Zorbia"), "non-empty list"),
    ("chunk-spans-odd", {"kvflow": {"chunk_spans": [0, 4, 8]}}, "flat list"),
    ("chunk-spans-beside-chunks", _with(chunk_spans=[0, 4]), "not both"),
    ("chunk-empty-text", _with(chunks=[{"text": ""}]), "empty chunk"),
    ("chunk-blank-text", _with(chunks=[{"text": "   \n"}]), "empty chunk"),
    ("chunk-text-not-string", _with(chunks=[{"text": 42}]), "must be a string"),
    ("chunk-empty-token-ids", _with(chunks=[{"token_ids": []}]), "empty chunk"),
    ("chunk-token-ids-strings", _with(chunks=[{"token_ids": ["a", "b"]}]), "list of integers"),
    ("chunk-two-forms", _with(chunks=[{"text": PASSAGES[0], "span": [0, 4]}]), "must be one of"),
    ("chunk-unknown-form", _with(chunks=[{"passage": PASSAGES[0]}]), "must be one of"),
    ("chunk-null", _with(chunks=[None]), "must be one of"),
    ("no-chunk-in-prompt", _with(chunks=[{"text": "Nothing like this is in the prompt."}]),
     "no chunk could be located"),
    ("unknown-key", _with(extra=1), "unknown keys"),
    ("unknown-method", _with(method="magic"), "method must be one of"),
    ("ratio-negative", _with(ratio=-0.5), "[0, 1]"),
    ("ratio-huge", _with(ratio=1e308), "[0, 1]"),
    ("ratio-string", _with(ratio="0.5"), "[0, 1]"),
    ("namespace-not-string", _with(namespace=7), "namespace must be a string"),
    ("question-after-nothing", _with(question={"text": "Atlantis"}), "question text not found"),
    ("question-wrong-type", _with(question="What?"), "question must be"),
    ("params-a-string", {"kvflow": "chunks please"}, "must be an object"),
    ("params-a-list", {"kvflow": [PASSAGES[0]]}, "must be an object"),
]


@pytest.mark.parametrize("params,reason", [c[1:] for c in FALLBACKS], ids=[c[0] for c in FALLBACKS])
def test_malformed_declaration_falls_back_with_reason(server, model_path, params, reason):
    status, out = _completion(server, model_path, params)
    assert status == 200, out
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert stats["fallback"] == "bad-request" and reason in stats["error"], stats
    assert out["usage"]["completion_tokens"] == 8  # answered by full prefill


def test_unlocatable_and_duplicated_chunks_are_prefilled(server, model_path):
    # One chunk not in the prompt, one declared twice but present once: both listed,
    # the rest is reused.
    params = _with(chunks=[{"text": PASSAGES[0]}, {"text": "Not in the prompt."},
                           {"text": PASSAGES[1]}, {"text": PASSAGES[1]}])
    status, out = _completion(server, model_path, params)
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert status == 200 and stats["fallback"] is None
    assert stats["chunks_unlocatable"] == [1, 3] and stats["chunks_hit"] == 2


# (id, request body changes, HTTP status, substring of the error message)
HTTP_ERRORS = [
    ("transfer-params-a-string", {"kv_transfer_params": "kvflow"}, 400, "kv_transfer_params"),
    ("transfer-params-a-list", {"kv_transfer_params": [GOOD]}, 400, "kv_transfer_params"),
    ("prompt-over-max-model-len", {"prompt": "word " * 600, "kv_transfer_params": {"kvflow": GOOD}},
     400, "maximum context length"),
    ("span-beyond-int64", {"kv_transfer_params": {"kvflow": {"chunks": [{"span": [0, 10**30]}]}}},
     400, "integers must be between"),
    ("max-tokens-negative", {"max_tokens": -1, "kv_transfer_params": {"kvflow": GOOD}}, 400, "max_tokens"),
    ("cache-salt-not-string", {"cache_salt": 5, "kv_transfer_params": {"kvflow": GOOD}}, 400, "cache_salt"),
]


@pytest.mark.parametrize("changes,status,message", [c[1:] for c in HTTP_ERRORS],
                         ids=[c[0] for c in HTTP_ERRORS])
def test_malformed_request_gets_a_clear_http_error(server, model_path, changes, status, message):
    body = {"model": model_path, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **changes}
    got, out = _post(server + "/v1/completions", body)
    error = out.get("error", out)
    text = json.dumps(error)
    assert got == status and message in text, (got, text[:500])


def test_body_not_json_gets_a_clear_http_error(server):
    got, out = _post(server + "/v1/completions", b"{not json")
    assert 400 <= got < 500 and out


def test_server_answers_correctly_after_the_bad_batch(server, model_path):
    status, out = _completion(server, model_path, {"kvflow": GOOD})
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert status == 200 and stats["fallback"] is None and stats["chunks_hit"] == 2
    assert out["choices"][0]["text"] == _answers["before"]
    assert urllib.request.urlopen(server + "/health", timeout=10).status == 200

"""Malformed and hostile requests through the real server: each gets a clear HTTP 4xx
or a full-prefill fallback with the reason in its stats, and the server keeps answering
correctly afterwards (same greedy answer as before the bad batch). Classes: malformed
declarations, declarations over the limits (and one that would cost many times its full
prefill), declarations vLLM's transport cannot carry, tenant keys spelled into a
namespace or a salt, and store files replaced by what cannot be read.

The chunk store is disk-only (no memory tier holds a chunk), so every hit reads its file."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import vllm_kvflow
from vllm_kvflow.client import KVFlowClient, ServerError
from vllm_kvflow.request import STATS_KEY
from vllm_kvflow.server import ServerProcess, cpu_server_args

pytestmark = pytest.mark.engine

PASSAGES = ["Zorbia\nThe capital of Zorbia is Quellport, a harbor city.",
            "Mirevale\nThe mayor of Mirevale is Ada Finch."]
PROMPT = "\n\n".join(PASSAGES) + "\n\nQuestion: What is the capital of Zorbia?\nAnswer:"
GOOD = {"chunks": [{"text": p} for p in PASSAGES]}


MAX_MODEL_LEN = 4096  # room for the amplification request's 3,000-token prompt


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chunks")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory, disk_dir):
    log = tmp_path_factory.mktemp("server") / "server.log"
    config = vllm_kvflow.transfer_config(store_capacity_gb=0, store_disk_path=str(disk_dir))
    # Two API server processes, as the README advises under concurrency: the declaration
    # checks and the streamed stats must hold in each (requests land on either).
    args = cpu_server_args(model_path, MAX_MODEL_LEN, 3) + ["--api-server-count", "2"]
    with ServerProcess(model_path, log, config, args) as srv:
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
    ("prompt-over-max-model-len", {"prompt": "word " * (MAX_MODEL_LEN + 100),
                                   "kv_transfer_params": {"kvflow": GOOD}},
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


# -- one request through completions, chat, and both streamed ---------------------------------
VARIANTS = ["completions", "chat", "completions-stream", "chat-stream"]


def _send(server, model_path, variant, kv_transfer_params, prompt=PROMPT, max_tokens=4, **extra):
    """(HTTP status, kvflow_stats) or (HTTP status, error message); a streamed response's
    stats come in its extra event (patches/stream_stats.py), an error inside a stream
    (what a 200 stream carries when the request fails after it started) as its code."""
    endpoint, _, stream = variant.partition("-")
    body = {"model": model_path, "max_tokens": max_tokens, "temperature": 0,
            "kv_transfer_params": kv_transfer_params, **extra}
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    client = KVFlowClient(server, model=model_path, timeout_s=300)
    try:
        if stream:
            events = list(client.stream_events(path, body))
            params = [e["kv_transfer_params"] for e in events if e.get("kv_transfer_params")]
            return 200, params[-1][STATS_KEY]
        return 200, client.post_json(path, body)["kv_transfer_params"][STATS_KEY]
    except ServerError as e:
        return e.status, e.message


# -- limits: too many chunks, chunks too short ---------------------------------------------------
LIMITS = [
    ("over-max-chunks", {"chunk_spans": [0, 1] * 1025}, "1025 chunks declared, more than max_chunks=1024"),
    ("all-chunks-too-short", {"chunks": [{"text": "Zorbia"}, {"text": "Mirevale"}]},
     "no chunk of at least min_chunk_tokens=16"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("params,reason", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_declaration_over_a_limit_falls_back_with_reason(server, model_path, variant, params, reason):
    status, stats = _send(server, model_path, variant, {"kvflow": params})
    assert status == 200 and stats["fallback"] == "bad-request" and reason in stats["error"], stats


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_chunk_is_prefilled_and_listed(server, model_path, variant):
    params = {"chunks": [{"text": PASSAGES[0]}, {"text": PASSAGES[1]}, {"text": "Question:"}]}
    status, stats = _send(server, model_path, variant, {"kvflow": params})
    assert status == 200 and stats["fallback"] is None, stats
    assert stats["chunks_too_short"] == [2] and stats["chunks"] == 2
    assert stats["chunks_hit"] + stats["chunks_missed"] == 2


def test_amplification_request_falls_back_within_a_small_multiple_of_full_prefill(server, model_path):
    """5,000 one-token chunks over a 3,000-token prompt under a fresh namespace: before the
    limits, 2,999 isolated misses took 27.8x the prompt's full prefill and stalled every
    other request. Both requests get their own cache salt: no prefix-cache hits."""
    prompt = [1000 + (i * 7919) % 40000 for i in range(3000)]
    body = {"model": model_path, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    status, _ = _post(server + "/v1/completions", {**body, "cache_salt": "amplification-full"})
    full_s = time.perf_counter() - start
    assert status == 200
    chunks = [{"token_ids": [prompt[i % len(prompt)]]} for i in range(5000)]
    start = time.perf_counter()
    status, out = _post(server + "/v1/completions", {
        **body, "cache_salt": "amplification-kvflow",
        "kv_transfer_params": {"kvflow": {"chunks": chunks, "namespace": "amplification"}}})
    kvflow_s = time.perf_counter() - start
    print(f"\n3,000-token prompt: full prefill {full_s:.2f} s, 5,000-chunk declaration {kvflow_s:.2f} s")
    stats = out["kv_transfer_params"][STATS_KEY]
    assert status == 200 and stats["fallback"] == "bad-request"
    assert "5000 chunks declared, more than max_chunks=1024" in stats["error"]
    assert kvflow_s < 3 * full_s + 1.0, (kvflow_s, full_s)


# -- transport: what vLLM cannot carry to the engine core is refused with HTTP 400 -------------------
def _nested(depth):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


TRANSPORT = [
    ("surrogate-in-chunk-text", {**GOOD, "chunks": [{"text": "Zorbia \ud800"}]},
     "kv_transfer_params.kvflow.chunks[0].text: not valid Unicode text"),
    ("surrogate-in-question", {**GOOD, "question": {"text": "What\udfff?"}},
     "kv_transfer_params.kvflow.question.text: not valid Unicode text"),
    ("surrogate-in-namespace", {**GOOD, "namespace": "\ud800tenant"},
     "kv_transfer_params.kvflow.namespace: not valid Unicode text"),
    ("surrogate-in-a-key", {**GOOD, "\udc80": 1}, "kv_transfer_params.kvflow (a key): not valid"),
    ("nested-900-deep", _nested(900), "kv_transfer_params.kvflow[0][0][0][0]: nested more than 4"),
    ("nested-in-a-chunk", {"chunks": [{"span": [[[0]], 4]}]}, "nested more than 4 levels"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("params,message", [c[1:] for c in TRANSPORT], ids=[c[0] for c in TRANSPORT])
def test_untransportable_declaration_gets_http_400(server, model_path, variant, params, message):
    status, error = _send(server, model_path, variant, {"kvflow": params})
    assert status == 400 and message in error, (status, error)


@pytest.mark.parametrize("variant", ["completions", "chat-stream"])
def test_oversized_declaration_gets_http_400(server, model_path, variant):
    params = {**GOOD, "question": {"text": "x" * (9 << 20)}}
    status, error = _send(server, model_path, variant, {"kvflow": params})
    assert status == 400 and "kv_transfer_params.kvflow: larger than 8 MiB" in error, (status, error)


def test_responses_endpoint_refuses_untransportable_declarations_too(server, model_path):
    body = {"model": model_path, "input": PROMPT, "max_output_tokens": 4,
            "kv_transfer_params": {"kvflow": {**GOOD, "namespace": "\ud800"}}}
    status, out = _post(server + "/v1/responses", body)
    assert status == 400 and "kv_transfer_params.kvflow.namespace" in json.dumps(out), out


def test_engine_is_alive_after_the_transport_batch(server, model_path):
    status, stats = _send(server, model_path, "chat-stream", {"kvflow": GOOD})
    assert status == 200 and stats["fallback"] is None and stats["chunks"] == 2
    assert urllib.request.urlopen(server + "/health", timeout=10).status == 200


# -- tenants: a namespace or salt that spells another tenant's pair hits nothing -----------------------
TENANT_DOCS = ["Harlo\nThe lighthouse of Harlo burns whale oil bought from the traders of Esk.",
               "Brevin\nThe granary of Brevin stores barley for the three winter months."]

ATTACKS = [
    ("namespace-spells-the-salt", {"namespace": "acme|salt=tenant-a"}, {}),
    ("salt-carries-the-old-blend-tag", {"namespace": "acme"}, {"cache_salt": "tenant-a|kvflow:x"}),
    ("namespace-spells-the-new-encoding", {"namespace": "4:acme8:tenant-a"}, {}),
]


@pytest.mark.parametrize("variant", ["completions", "chat-stream"])
@pytest.mark.parametrize("kvflow,extra", [c[1:] for c in ATTACKS], ids=[c[0] for c in ATTACKS])
def test_spelled_tenant_keys_never_hit_another_tenants_chunks(server, model_path, request, variant,
                                                              kvflow, extra):
    """Tenant-a (namespace "acme", cache salt "tenant-a") stores two chunks; an attacker
    without tenant-a's pair finds none of them. Fresh documents per case: an attacker's
    own earlier misses would be its hits."""
    docs = [f"{d} Ledger {request.node.callspec.id}." for d in TENANT_DOCS]
    prompt = "\n\n".join(docs) + "\n\nQuestion: What does the lighthouse of Harlo burn?\nAnswer:"
    chunks = {"chunks": [{"text": d} for d in docs]}

    def victim():
        return _send(server, model_path, "completions", {"kvflow": {**chunks, "namespace": "acme"}},
                     prompt=prompt, cache_salt="tenant-a")[1]

    assert victim()["chunks_missed"] == 2
    status, stats = _send(server, model_path, variant, {"kvflow": {**chunks, **kvflow}},
                          prompt=prompt, **extra)
    assert status == 200 and stats["fallback"] is None, stats
    assert stats["chunks_hit"] == 0 and stats["chunks_missed"] == 2, stats
    assert victim()["chunks_hit"] == 2  # the chunks are there, for their tenant


# -- disk faults: a store file replaced by a FIFO or a directory is a miss, never an error ----------
FAULT_DOC = "Wenmoor\nThe wells of Wenmoor are lined with green stone from the quarry at Sollen."
FAULT_PROMPT = FAULT_DOC + "\n\nQuestion: What lines the wells of Wenmoor?\nAnswer:"


def _wait_for(predicate, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_store_file_replaced_by_fifo_or_directory_is_recomputed(server, model_path, disk_dir):
    def ask():
        status, stats = _send(server, model_path, "completions",
                              {"kvflow": {"chunks": [{"text": FAULT_DOC}]}}, prompt=FAULT_PROMPT)
        assert status == 200 and stats["fallback"] is None, stats
        return stats, stats["store"]["tiers"]["disk"]

    before = set(os.listdir(disk_dir))
    assert ask()[0]["chunks_missed"] == 1
    _wait_for(lambda: set(os.listdir(disk_dir)) - before, "the chunk's file")
    (name,) = set(os.listdir(disk_dir)) - before
    path = disk_dir / name
    _wait_for(lambda: ask()[1]["queued"] == 0, "the write to finish")
    stats, disk = ask()
    assert stats["chunks_hit"] == 1  # read from its file: nothing is kept in memory
    errors = disk["read_errors"]

    path.unlink()
    os.mkfifo(path)  # an open for reading would wait for a writer forever
    stats, disk = ask()
    assert (stats["chunks_hit"], stats["chunks_missed"]) == (0, 1)
    assert disk["read_errors"] == errors + 1
    _wait_for(lambda: path.is_file(), "the recomputed chunk to be written over the FIFO")
    assert ask()[0]["chunks_hit"] == 1

    path.unlink()
    path.mkdir()
    stats, disk = ask()
    assert (stats["chunks_hit"], stats["chunks_missed"]) == (0, 1)
    assert disk["read_errors"] == errors + 2
    stats, disk = ask()  # the directory stays (not ours): a miss each time, not an error
    assert stats["chunks_missed"] == 1 and disk["read_errors"] == errors + 2
    path.rmdir()


def test_server_answers_correctly_after_the_bad_batch(server, model_path):
    status, out = _completion(server, model_path, {"kvflow": GOOD})
    stats = out["kv_transfer_params"]["kvflow_stats"]
    assert status == 200 and stats["fallback"] is None and stats["chunks_hit"] == 2
    assert out["choices"][0]["text"] == _answers["before"]
    assert urllib.request.urlopen(server + "/health", timeout=10).status == 200

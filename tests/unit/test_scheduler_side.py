"""The connector's scheduler side without vLLM's scheduler: which loads are synchronous
(a lone request on an idle engine) and which asynchronous (anything else live), and the
bound on loads in flight."""
from __future__ import annotations

import types

import pytest

pytest.importorskip("vllm")

from vllm_kvflow.config import KVFlowConfig  # noqa: E402
from vllm_kvflow.connector.scheduler import KVFlowScheduler  # noqa: E402

PROMPT = list(range(100, 200))
SPANS = {"kvflow": {"chunk_spans": [5, 40, 40, 80], "method": "none"}}


def request(req_id, params=SPANS):
    return types.SimpleNamespace(request_id=req_id, kv_transfer_params=params,
                                 prompt_token_ids=PROMPT, cache_salt=None)


def blocks(ids):
    return types.SimpleNamespace(get_block_ids=lambda: (ids,))


def step(sched, scheduled=(), finished=()):
    out = types.SimpleNamespace(total_num_scheduled_tokens=len(scheduled),
                                num_scheduled_tokens={r: 1 for r in scheduled},
                                finished_req_ids=set(finished), scheduled_new_reqs=[])
    return sched.build_connector_meta(out)


def admit(sched, req):
    n, load_async = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, blocks([1, 2, 3]), n)
    return n, load_async


def test_a_lone_request_loads_synchronously_others_asynchronously():
    sched = KVFlowScheduler(KVFlowConfig(), None)
    assert admit(sched, request("a")) == (80, False)  # nothing else live: synchronous
    meta = step(sched, scheduled=["a"])
    assert [p.sync for p in meta.loads] == [True]
    from vllm_kvflow.connector.metadata import KVFlowWorkerMetadata

    sched.update_connector_output(types.SimpleNamespace(
        kv_connector_worker_meta=KVFlowWorkerMetadata({"a": {"chunks_hit": 2}})))
    assert not sched._in_flight  # a's load is done...
    # ...but 'a' is still running (decoding): 'b' must not hold up its step.
    assert admit(sched, request("b")) == (80, True)
    assert [p.sync for p in step(sched, scheduled=["a"]).loads] == [False]


def test_an_idle_engine_after_finished_requests_is_idle_again():
    """An idle engine runs no steps: what was live and finished must not count."""
    sched = KVFlowScheduler(KVFlowConfig(), None)
    step(sched, scheduled=["x", "y"])  # two plain requests ran
    sched.request_finished(request("x", None), [])
    step(sched, finished=["y"])
    assert admit(sched, request("c")) == (80, False)


def test_loads_in_flight_are_bounded():
    sched = KVFlowScheduler(KVFlowConfig(max_pending_loads=2), None)
    step(sched, scheduled=["busy"])  # another request keeps every load asynchronous
    assert admit(sched, request("a"))[1] and admit(sched, request("b"))[1]
    assert sched.get_num_new_matched_tokens(request("c"), 0) == (None, False)  # wait
    meta = step(sched, scheduled=["busy"])
    assert {p.req_id for p in meta.loads} == {"a", "b"}


def test_a_plain_request_admitted_earlier_in_the_same_pass_counts_as_live():
    """vLLM admits several waiting requests in one scheduling pass; a plain one admitted
    before a kvflow request shares its step, so that load must not run inside it."""
    sched = KVFlowScheduler(KVFlowConfig(), None)
    plain = request("plain", None)
    assert sched.get_num_new_matched_tokens(plain, 0) == (0, False)
    sched.update_state_after_alloc(plain, blocks([7]), 0)
    assert admit(sched, request("k")) == (80, True)


def test_a_scheduler_output_without_the_fields_read_fails_loudly():
    from vllm_kvflow.patches.scheduler_output import step_view

    with pytest.raises(RuntimeError, match="SchedulerOutput lacks"):
        step_view(types.SimpleNamespace(num_scheduled_tokens={}, finished_req_ids=set()))
    sched = KVFlowScheduler(KVFlowConfig(), None)
    with pytest.raises(RuntimeError):
        sched.build_connector_meta(types.SimpleNamespace())


def test_chunk_texts_are_tokenized_once_and_the_cache_is_bounded(monkeypatch):
    import vllm_kvflow.connector.scheduler as sched_mod

    calls = []

    class Tokenizer:
        def encode(self, text, add_special_tokens=False):
            calls.append(text)
            return [len(text), 7]

    monkeypatch.setattr(sched_mod, "TOKEN_CACHE_ENTRIES", 2)
    sched = KVFlowScheduler(KVFlowConfig(), None)
    sched._tokenizer = Tokenizer()
    assert sched._tokenize("doc a") == [5, 7] and sched._tokenize("doc a") == [5, 7]
    sched._tokenize("doc bb")
    sched._tokenize("doc a")  # a is now the most recent: c evicts b
    sched._tokenize("doc ccc")
    sched._tokenize("doc a")
    sched._tokenize("doc bb")
    assert calls == ["doc a", "doc bb", "doc ccc", "doc bb"]


def test_a_lone_request_loads_asynchronously_where_steps_are_timed():
    """CPU engines bound each step's blend work in time: a lone request's load goes to
    the work queue too, so that a request arriving meanwhile waits for one short step."""
    sched = KVFlowScheduler(KVFlowConfig(), None, sync_loads=False)
    assert admit(sched, request("a")) == (80, True)
    assert [p.sync for p in step(sched).loads] == [False]


def test_stats_that_arrive_in_the_update_finishing_the_request_still_reach_it():
    """A request may stop on its first token in the very update that carries its load's
    stats (a synchronous load; on GPU an asynchronous load's stats come a step late,
    with the first token): request_finished returns the live dict, and the stats read
    later in that update land in it."""
    from vllm_kvflow.connector.metadata import KVFlowWorkerMetadata
    from vllm_kvflow.connector.scheduler import STATS_KEY

    sched = KVFlowScheduler(KVFlowConfig(), None)
    step(sched, scheduled=["busy"])
    assert admit(sched, request("a"))[1]  # asynchronous
    step(sched, scheduled=["busy"])  # its plan goes to the worker
    _, params = sched.request_finished(request("a"), [])
    stats = params[STATS_KEY]
    assert "chunks_hit" not in stats
    sched.update_connector_output(types.SimpleNamespace(
        kv_connector_worker_meta=KVFlowWorkerMetadata({"a": {"chunks_hit": 2}})))
    assert stats["chunks_hit"] == 2 and stats["fallback"] is None


class _CountingTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [len(word) for word in text.split()]


def test_the_tokenizer_loads_at_engine_start_not_in_the_first_requests_step(monkeypatch):
    """Loading it at the first request declaring chunk texts held up that whole step
    (Llama-3.1's takes 0.5-0.9 s to load on a small CPU)."""
    from vllm_kvflow.connector import scheduler as module

    loads = []
    monkeypatch.setattr(module, "_load_tokenizer", lambda path: loads.append(path) or _CountingTokenizer())
    sched = KVFlowScheduler(KVFlowConfig(), "/models/some-tokenizer")
    assert loads == ["/models/some-tokenizer"]
    assert sched._tokenize("one three") == [3, 5]
    assert loads == ["/models/some-tokenizer"]  # not again


def test_a_tokenizer_that_fails_at_start_is_tried_again_by_the_first_request(monkeypatch, caplog):
    from vllm_kvflow.connector import scheduler as module

    attempts = []

    def flaky(path):
        attempts.append(path)
        if len(attempts) == 1:
            raise OSError("not there yet")
        return _CountingTokenizer()

    monkeypatch.setattr(module, "_load_tokenizer", flaky)
    with caplog.at_level("WARNING", logger="vllm_kvflow"):
        sched = KVFlowScheduler(KVFlowConfig(), "/models/t")
    assert "could not load the tokenizer" in caplog.text
    assert sched._tokenize("ab") == [2] and len(attempts) == 2


class _BatchCountingTokenizer(_CountingTokenizer):
    def __init__(self):
        self.batches, self.singles = [], 0

    def __call__(self, texts, add_special_tokens=True):
        self.batches.append(list(texts))
        return {"input_ids": [self.encode(t) for t in texts]}

    def encode(self, text, add_special_tokens=True):
        self.singles += 1
        return super().encode(text)


def test_a_requests_new_texts_are_tokenized_in_one_batch_and_cached(monkeypatch):
    from vllm_kvflow.connector import scheduler as module

    tok = _BatchCountingTokenizer()
    monkeypatch.setattr(module, "_load_tokenizer", lambda path: tok)
    sched = KVFlowScheduler(KVFlowConfig(), "/models/t")
    tok.singles = 0  # the warm-up encode at start
    sched._tokenize_together(["aa b", "ccc", "aa b", "dd"])
    assert tok.batches == [["aa b", "ccc", "dd"]]  # once each, in order
    assert [sched._tokenize(t) for t in ("aa b", "ccc", "dd")] == [[2, 1], [3], [2]]
    assert tok.singles == 3  # the batch's own encodes: parsing found them all cached
    sched._tokenize_together(["ccc", "e"])  # one new text: nothing to spread
    assert len(tok.batches) == 1


def test_parsing_hands_the_texts_to_locate_ahead_stripped_once_the_size_is_checked():
    from vllm_kvflow.request import RequestError, parse_request

    ahead = []
    params = {"chunks": [{"text": " alpha "}, {"span": [0, 4]}, {"text": ""}, {"text": 5},
                         "junk", {"token_ids": [1]}, {"text": "beta"}],
              "question": {"text": "gamma\n"}}
    with pytest.raises(RequestError):  # the malformed items are still parsing's to report
        parse_request(params, PROMPT, KVFlowConfig(), _CountingTokenizer().encode,
                      tokenize_ahead=ahead.append)
    assert ahead == [["alpha", "beta", "gamma"]]
    for bad in (None, [], "x", {"chunks": "x"}, {"chunks": None, "question": "q"},
                {"chunks": [{"text": "a"}] * 11}):  # the last: more than max_chunks
        ahead.clear()
        with pytest.raises(RequestError):
            parse_request(bad, PROMPT, KVFlowConfig(max_chunks=10), _CountingTokenizer().encode,
                          tokenize_ahead=ahead.append)
        assert ahead == [], bad


def test_batched_tokenization_equals_one_text_at_a_time_with_the_real_tokenizer():
    """The batch fills the cache that parse_request reads: it must give the same ids as
    the one-by-one encode it stands in for (SmolLM2's tokenizer, built by make-model)."""
    from transformers import AutoTokenizer

    from vllm_kvflow.bench.load import document_pool
    from vllm_kvflow.model import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    texts = [d["text"].strip() for d in document_pool(12, 120, seed=3)]
    texts += ["  Ünïcode — ok?  ".strip(), "Field: value\nOther: 12.5%"]
    batch = tok(texts, add_special_tokens=False)["input_ids"]
    assert batch == [tok.encode(t, add_special_tokens=False) for t in texts]

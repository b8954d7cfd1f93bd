"""Per-request declarations through the real engine: malformed input degrades to full
prefill with the reason in the stats, and the engine keeps answering correctly."""
from __future__ import annotations

import pytest

from vllm_kvflow.bench.dataset import generate as make_dataset
from vllm_kvflow.rag import build_rag_prompt
from vllm_kvflow.request import STATS_KEY

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def rag(tokenizer):
    item = make_dataset(1, num_passages=3, passage_words=30, seed=21)[0]
    return build_rag_prompt(tokenizer, item["question"], item["passages"], method="full")


def _bad_declarations(rag):
    n = len(rag.prompt_token_ids)
    (s0, e0), (s1, e1) = rag.chunk_spans[:2]
    return {
        "span out of range": {"chunks": [{"span": [s0, n + 5]}]},
        "negative span": {"chunks": [{"span": [-3, e0]}]},
        "empty span": {"chunks": [{"span": [s0, s0]}]},
        "overlapping spans": {"chunks": [{"span": [s0, e0]}, {"span": [s0 + 1, e0 + 2]}]},
        "span of strings": {"chunks": [{"span": ["a", "b"]}]},
        "chunks not a list": {"chunks": "all of them"},
        "no chunks": {"chunks": []},
        "empty chunk text": {"chunks": [{"text": "   "}]},
        "empty token ids": {"chunks": [{"token_ids": []}]},
        "unknown chunk form": {"chunks": [{"doc": "x"}]},
        "unknown key": {"chunks": [{"span": [s0, e0]}], "recompute": 0.2},
        "bad method": {"chunks": [{"span": [s0, e0]}], "method": "magic"},
        "ratio too big": {"chunks": [{"span": [s0, e0]}], "ratio": 7},
        "ratio not a number": {"chunks": [{"span": [s0, e0]}], "ratio": "0.1"},
        "text not in prompt": {"chunks": [{"text": "This sentence is nowhere in the prompt."}]},
        "params not an object": ["span", 1, 2],
    }


def test_malformed_declarations_fall_back_with_reason(generate, rag):
    bad = _bad_declarations(rag)
    prompts = [rag.vllm_prompt()] * (len(bad) + 1)
    params = [{"kvflow": body} for body in bad.values()] + [rag.kv_transfer_params]
    outs = generate(prompts, params)
    reference = outs[-1].outputs[0].token_ids  # full prefill
    for (name, _), out in zip(bad.items(), outs):
        stats = out.kv_transfer_params[STATS_KEY]
        assert stats["fallback"] == "bad-request", name
        assert stats["error"], name
        assert out.outputs[0].token_ids == reference, name  # full prefill, correct answer


def test_engine_still_reuses_after_bad_requests(generate, tokenizer, rag):
    test_malformed_declarations_fall_back_with_reason(generate, rag)
    item = make_dataset(1, num_passages=3, passage_words=30, seed=21)[0]
    good = build_rag_prompt(tokenizer, item["question"], item["passages"], method="random", ratio=1.0)
    out, = generate([good.vllm_prompt()], [good.kv_transfer_params])
    stats = out.kv_transfer_params[STATS_KEY]
    assert stats["fallback"] is None and stats["tokens_reused"] > 0


def test_chunk_texts_are_located_and_unlocatable_ones_reported(generate, tokenizer, rag):
    texts = [{"text": t} for t in rag.chunk_texts] + [{"text": "Not part of this prompt at all."}]
    out, = generate([rag.vllm_prompt()], [{"kvflow": {"chunks": texts, "method": "none"}}])
    stats = out.kv_transfer_params[STATS_KEY]
    assert stats["chunks_unlocatable"] == [len(rag.chunk_texts)]
    assert stats["chunks"] == len(rag.chunk_texts)
    assert stats["tokens_reused"] == sum(e - s for s, e in rag.chunk_spans)


@pytest.mark.parametrize("method", ["none", "random", "epic", "cacheblend", "infoflow",
                                    "infoflow-reorder", "infoflow-kdev", "oracle-kv"])
def test_each_method_runs_with_its_budget(generate, tokenizer, method):
    items = make_dataset(2, num_passages=4, passage_words=40, seed=31)
    prompts = [build_rag_prompt(tokenizer, it["question"], it["passages"], method=method, ratio=0.15)
               for it in items]
    outs = generate([p.vllm_prompt() for p in prompts], [p.kv_transfer_params for p in prompts])
    for out, p in zip(outs, prompts):
        stats = out.kv_transfer_params[STATS_KEY]
        chunk_tokens = sum(e - s for s, e in p.chunk_spans)
        # Candidates: chunks and the separators between them (the header is exact).
        assert stats["candidate_tokens"] == p.chunk_spans[-1][1] - p.chunk_spans[0][0]
        expected = 0 if method == "none" else int(0.15 * stats["candidate_tokens"])
        if method == "epic":  # per-segment floors may round below the total budget
            assert expected - 2 * len(p.chunk_spans) <= stats["tokens_recomputed"] <= expected
        else:
            assert stats["tokens_recomputed"] == expected
        assert out.outputs[0].token_ids, "no output"
        if method == "infoflow-reorder":
            assert sorted(stats["reorder"]) == list(range(len(p.chunk_spans)))
            assert stats["tokens_reused"] == chunk_tokens

"""Shared by the engine tests that compare chunk reuse with full prefill on one engine
(test_reuse_exactness.py on SmolLM2, test_model_families.py on dummy-weight families)."""
from __future__ import annotations

import math

from vllm_kvflow.bench.dataset import generate as make_dataset
from vllm_kvflow.rag import build_rag_prompt
from vllm_kvflow.request import STATS_KEY

# float32 engine: recompute and full prefill differ by summation order only.
LOGPROB_TOL = 2e-3


def make_items(n, seed, passages=3, words=40):
    return make_dataset(n, num_passages=passages, passage_words=words, seed=seed)


def run_rag(generate, tokenizer, items, max_tokens=12, **settings):
    """RAG prompts of items with kvflow settings; returns (outs, prompts)."""
    prompts = [build_rag_prompt(tokenizer, it["question"], it["passages"], **settings) for it in items]
    outs = generate([p.vllm_prompt() for p in prompts], [p.kv_transfer_params for p in prompts],
                    max_tokens=max_tokens)
    return outs, prompts


def run_pair(generate, tokenizer, items, **settings):
    """Full prefill and kvflow on the same prompts; returns (full_outs, kv_outs, prompts)."""
    outs_full, _ = run_rag(generate, tokenizer, items, method="full")
    outs_kv, reuse = run_rag(generate, tokenizer, items, **settings)
    return outs_full, outs_kv, reuse


def first_logprob(out):
    lp = out.outputs[0].logprobs[0]
    tok = out.outputs[0].token_ids[0]
    return lp[tok].logprob


def assert_identical(outs_full, outs_kv):
    for f, k in zip(outs_full, outs_kv):
        assert k.outputs[0].token_ids == f.outputs[0].token_ids, (f.outputs[0].text, k.outputs[0].text)
        assert math.isclose(first_logprob(k), first_logprob(f), abs_tol=LOGPROB_TOL)


def candidate_tokens(prompt) -> int:
    """Tokens from the first chunk's start to the last chunk's end: chunks + separators."""
    return prompt.chunk_spans[-1][1] - prompt.chunk_spans[0][0]


def assert_all_recomputed(outs_kv, prompts):
    """Every chunk token came from the store and was recomputed (ratio 1.0): exactness
    then comes from the executor, not from a fallback to full prefill."""
    for out, prompt in zip(outs_kv, prompts):
        stats = out.kv_transfer_params[STATS_KEY]
        chunk_tokens = sum(e - s for s, e in prompt.chunk_spans)
        assert stats["fallback"] is None and "error" not in stats, stats
        assert stats["tokens_reused"] == chunk_tokens > 0
        # Candidates: the chunks and the separators between them (the chat header before
        # the first chunk is glue at the prompt's start: exact, not a candidate).
        assert stats["candidate_tokens"] == candidate_tokens(prompt)
        assert stats["tokens_recomputed"] == stats["candidate_tokens"]
        assert stats["chunks_hit"] + stats["chunks_missed"] == len(prompt.chunk_spans)

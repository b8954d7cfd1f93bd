"""The scoring pass on the padded static buffers of its CUDA graphs (blend/score_graph.py)
against the executor's own eager scoring, under TRITON_INTERPRET=1.

On CPU nothing is captured: the same pass runs eagerly on the same buffers, so this
checks what the graphs add to the eager pass (padding rows at position -1 writing into
the null block, a block table padded to the context bucket, context lengths read on
the device by the kernels). The capture itself is checked on the GPU
(tests/gpu/test_score_graph_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from interpreter_child import require_interpreter_child, run_interpreter_child
from toy_decoder import Toy


def test_score_graph_under_triton_interpreter():
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_score_graph_under_triton_interpreter")


def _cache(NB, BS, Hkv, D, seed):
    from vllm_kvflow.blend.paged import split_kv_cache

    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(NB, BS, Hkv, 2 * D, generator=gen).transpose(1, 2)  # FLASH_ATTN
    return raw, split_kv_cache(raw, "flash", D)


@pytest.mark.parametrize("Hq,Hkv,n_question,context", [(4, 2, 6, 50), (8, 2, 17, 70)])
def test_interp_padded_graph_pass_equals_eager_score(interp, Hq, Hkv, n_question, context):
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.score_graph import MIN_ROWS, ScoreGraphs

    D, BS, NB = 32, 16, 10
    toy = Toy(Hq, Hkv, D)
    ex = LayerwiseExecutor(toy)
    block_ids = [6, 2, 7, 9, 4, 3, 8]  # never block 0: the null block takes the padding
    ids = list(range(40, 40 + n_question))
    q0 = context + 3  # "Question: " tokens sit between context and question
    layers = [1, 2]

    raw_a, (k_a, v_a) = _cache(NB, BS, Hkv, D, seed=1)
    layer_views = lambda k, v: ([k, k.clone(), k.clone()], [v, v.clone(), v.clone()])  # noqa: E731
    keys_a, values_a = layer_views(k_a, v_a)
    keys_b, values_b = [x.clone() for x in keys_a], [x.clone() for x in values_a]
    original = [x.clone() for x in keys_a + values_a]

    kv = PagedKV(keys_a, values_a, torch.tensor(block_ids), BS)
    eager = ex.score(torch.tensor(ids), torch.arange(q0, q0 + n_question), kv, context, layers)

    graphs = ScoreGraphs(ex, keys_b, values_b, BS, layers)
    assert not graphs.capture  # CPU: the pass runs eagerly on the graph's buffers
    got = graphs.score(ids, q0, context, block_ids)
    assert got.shape == (context,)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-7)
    # The same question K/V in the request's blocks (up to summation order: padding
    # changes the matmul shapes); every other slot untouched but the null block's.
    question = torch.zeros(NB, BS, dtype=torch.bool)
    for p in range(context, context + n_question):
        question[block_ids[p // BS], p % BS] = True
    for a, b, before in zip(keys_a + values_a, keys_b + values_b, original):
        torch.testing.assert_close(a[question], b[question], rtol=1e-5, atol=1e-6)
        assert not torch.equal(b[question], before[question])
        keep = ~question
        keep[0] = False
        assert torch.equal(b[keep], before[keep]) and torch.equal(a[keep], before[keep])
    # A second request, shorter: in the same buckets it reuses the buffers.
    got2 = graphs.score(ids[:3], q0, context - 5, block_ids)
    assert len(graphs._entries) == (1 if n_question <= MIN_ROWS else 2)
    assert got2.shape == (context - 5,)
    kv2 = PagedKV([x.clone() for x in keys_b], [x.clone() for x in values_b], torch.tensor(block_ids), BS)
    eager2 = ex.score(torch.tensor(ids[:3]), torch.arange(q0, q0 + 3), kv2, context - 5, layers)
    torch.testing.assert_close(got2, eager2, rtol=1e-5, atol=1e-7)


def test_interp_long_question_is_left_to_the_eager_pass(interp):
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.score_graph import MAX_ROWS, ScoreGraphs

    raw, (k, v) = _cache(4, 16, 2, 32, seed=2)
    graphs = ScoreGraphs(LayerwiseExecutor(Toy(4, 2, 32)), [k], [v], 16, [0])
    assert graphs.score(list(range(MAX_ROWS + 1)), 10, 5, [1, 2]) is None
    assert graphs.score([], 10, 5, [1, 2]) is None


def test_interp_graphs_only_without_tensor_parallelism(interp, monkeypatch):
    """Under tensor parallelism the layers' all-reduce cannot be captured outside vLLM's
    own graph_capture(): the pipeline then scores eagerly."""
    import types

    import vllm_kvflow.blend.pipeline as pipeline
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.score_graph import ScoreGraphs

    raw, (k, v) = _cache(4, 16, 2, 32, seed=3)
    kv = PagedKV([k], [v], torch.tensor([1, 2]), 16)
    stub = types.SimpleNamespace(_graphs=None, executor=LayerwiseExecutor(Toy(4, 2, 32)),
                                 scoring_layers=[0])
    monkeypatch.setattr(pipeline, "tp_world_size", lambda: 2)
    assert pipeline.BlendPipeline._score_graphs(stub, kv) is None
    monkeypatch.setattr(pipeline, "tp_world_size", lambda: 1)
    assert isinstance(pipeline.BlendPipeline._score_graphs(stub, kv), ScoreGraphs)
    monkeypatch.setenv("KVFLOW_SCORE_GRAPHS", "0")
    stub._graphs = None
    assert pipeline.BlendPipeline._score_graphs(stub, kv) is None

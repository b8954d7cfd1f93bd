"""The scoring and recompute passes on the padded static buffers of their CUDA graphs
(blend/pass_graphs.py) against the executor's own eager passes, under TRITON_INTERPRET=1.

On CPU nothing is captured: the same passes run eagerly on the same buffers, so this
checks what the graphs add to the eager passes (padding rows at position -1 writing into
the null block, a block table padded to the context bucket, lengths read on the device
by the kernels, slots derived inside the pass). The capture itself is checked on the
GPU (tests/gpu/test_pass_graphs_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from interpreter_child import require_interpreter_child, run_interpreter_child
from toy_decoder import Toy

BLOCK_IDS = [6, 2, 7, 9, 4, 3, 8]  # never block 0: the null block takes the padding


def test_pass_graphs_under_triton_interpreter():
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_pass_graphs_under_triton_interpreter")


def _layers(NB, BS, Hkv, D, seed, num_layers=3):
    """Per-layer FLASH_ATTN key/value views of random caches."""
    from vllm_kvflow.blend.paged import split_kv_cache

    gen = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(num_layers):
        raw = torch.randn(NB, BS, Hkv, 2 * D, generator=gen).transpose(1, 2)
        k, v = split_kv_cache(raw, "flash", D)
        keys.append(k)
        values.append(v)
    return keys, values


def _clone(tensors):
    return [x.clone() for x in tensors]


def _slots_of(positions, BS, NB):
    mask = torch.zeros(NB, BS, dtype=torch.bool)
    for p in positions:
        mask[BLOCK_IDS[p // BS], p % BS] = True
    return mask


@pytest.mark.parametrize("Hq,Hkv,n_question,context", [(4, 2, 6, 50), (8, 2, 17, 70)])
def test_interp_padded_score_pass_equals_eager_score(interp, Hq, Hkv, n_question, context):
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs

    D, BS, NB = 32, 16, 10
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    ids = torch.arange(40, 40 + n_question)
    q0 = context + 3  # "Question: " tokens sit between context and question
    layers = [1, 2]
    keys, values = _layers(NB, BS, Hkv, D, seed=1)
    original = _clone(keys + values)

    # The executor's eager score: gathered keys, the question's K/V in a scratch copy.
    kv = PagedKV(_clone(keys), _clone(values), torch.tensor(BLOCK_IDS), BS)
    eager = ex.score(ids, torch.arange(q0, q0 + n_question), kv, context, layers)

    graphs = PassGraphs(ex, keys, values, BS, layers)
    assert not graphs.capture  # CPU: the pass runs eagerly on the graph's buffers
    got = graphs.score(ids, q0, context, torch.tensor(BLOCK_IDS))
    assert got.shape == (context,)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-7)
    # In place: the question's K/V land in its own slots (which vLLM's forward then
    # overwrites); every other slot untouched but the null block's.
    question = _slots_of(range(context, context + n_question), BS, NB)
    keep = ~question
    keep[0] = False
    for after, before in zip(keys + values, original):
        assert not torch.equal(after[question], before[question])
        assert torch.equal(after[keep], before[keep])
    # A second request, shorter: in the same buckets it reuses the buffers.
    got2 = graphs.score(ids[:3], q0, context - 5, torch.tensor(BLOCK_IDS))
    assert len(graphs._entries) == (1 if n_question <= 16 else 2)
    kv2 = PagedKV(_clone(keys), _clone(values), torch.tensor(BLOCK_IDS), BS)
    eager2 = ex.score(ids[:3], torch.arange(q0, q0 + 3), kv2, context - 5, layers)
    torch.testing.assert_close(got2, eager2, rtol=1e-5, atol=1e-7)


def test_interp_long_question_is_scored_unpadded(interp, monkeypatch):
    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV

    monkeypatch.setattr(pg, "SCORE_ROWS", (16, 4))  # make 6 rows "longer than every bucket"
    D, BS, NB = 32, 16, 10
    ex = LayerwiseExecutor(Toy(4, 2, D))
    keys, values = _layers(NB, BS, 2, D, seed=2)
    kv = PagedKV(_clone(keys), _clone(values), torch.tensor(BLOCK_IDS), BS)
    eager = ex.score(torch.arange(6), torch.arange(43, 49), kv, 40, [0, 1])
    graphs = pg.PassGraphs(ex, keys, values, BS, [0, 1])
    torch.testing.assert_close(graphs.score(torch.arange(6), 43, 40, torch.tensor(BLOCK_IDS)),
                               eager, rtol=1e-5, atol=1e-7)
    assert not graphs._entries  # built for the call, not kept
    with pytest.raises(ValueError, match="question token"):
        graphs.score(torch.arange(0), 43, 40, torch.tensor(BLOCK_IDS))


@pytest.mark.parametrize("Hq,Hkv,selected", [(4, 2, [3, 9, 10, 41, 57, 58, 59, 80]),
                                             (8, 2, list(range(0, 90, 4)))])
def test_interp_padded_recompute_pass_equals_eager_prefill(interp, Hq, Hkv, selected):
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, prefill_bucket

    D, BS, NB, context_end = 32, 16, 10, 95
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    keys, values = _layers(NB, BS, Hkv, D, seed=3)
    original = _clone(keys + values)
    positions = torch.tensor(selected)
    ids = 7 * positions + 1

    kv = PagedKV(_clone(keys), _clone(values), torch.tensor(BLOCK_IDS), BS)
    ex.prefill(ids, positions, kv)

    graphs = PassGraphs(ex, keys, values, BS, [1])
    assert graphs.prefill(ids, positions, context_end, torch.tensor(BLOCK_IDS))
    assert prefill_bucket(len(selected)) > len(selected)  # the buffers carry padding rows
    recomputed = _slots_of(selected, BS, NB)
    keep = ~recomputed
    keep[0] = False
    for eager, padded, before in zip(kv.keys + kv.values, keys + values, original):
        torch.testing.assert_close(padded[recomputed], eager[recomputed], rtol=1e-5, atol=1e-6)
        assert not torch.equal(padded[recomputed], before[recomputed])
        assert torch.equal(padded[keep], before[keep]) and torch.equal(eager[keep], before[keep])


def test_interp_prefill_buckets():
    from vllm_kvflow.blend.pass_graphs import PREFILL_ROWS, prefill_bucket, recompute_buckets

    assert [prefill_bucket(n) for n in (1, 16, 17, 256)] == [16, 16, 32, 256]
    for n in list(range(257, 5000, 37)) + [1192, 4779]:
        rows = prefill_bucket(n)
        assert n <= rows <= n * (1 + 1 / 8), (n, rows)
    assert prefill_bucket(1192) == 1280 and prefill_bucket(PREFILL_ROWS[1]) == PREFILL_ROWS[1]
    # What the engine start captures: every bucket up to the step's budget, each once.
    buckets = recompute_buckets(1024)
    assert buckets[:6] == [16, 32, 64, 128, 256, 288] and buckets[-1] == 1024
    assert sorted(set(buckets)) == buckets and len(buckets) == 5 + 8 + 8
    assert {prefill_bucket(n) for n in range(1, 1025)} == set(buckets)
    assert recompute_buckets(10 ** 6)[-1] == PREFILL_ROWS[1] and recompute_buckets(0) == [16]


def test_interp_recompute_beyond_the_largest_bucket_is_left_to_the_executor(interp, monkeypatch):
    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    keys, values = _layers(4, 16, 2, 32, seed=4, num_layers=1)
    graphs = pg.PassGraphs(LayerwiseExecutor(Toy(4, 2, 32)), keys, values, 16, [0])
    monkeypatch.setattr(pg, "PREFILL_ROWS", (16, 8))
    assert not graphs.prefill(torch.arange(9), torch.arange(9), 20, torch.tensor([1, 2]))
    assert not graphs.prefill(torch.arange(0), torch.arange(0), 20, torch.tensor([1, 2]))


def test_interp_engine_start_captures_every_recompute_bucket_writing_only_the_null_block(interp, monkeypatch):
    """capture_recompute (engine start) runs each bucket's pass once on padding only: every
    bucket up to the budget gets its graph, and no cache slot changes but the null
    block's. Requests of any count and context then replay those graphs. (On CPU the
    capture itself is stood in for; tests/gpu captures for real.)"""
    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    keys, values = _layers(22, 16, 2, 32, seed=9)
    original = _clone(keys + values)
    graphs = pg.PassGraphs(LayerwiseExecutor(Toy(4, 2, 32)), keys, values, 16, [1], capture=True,
                           max_context=100)
    captured = []
    monkeypatch.setattr(graphs, "_capture", lambda buf, kind: captured.append(buf.ids.numel()))
    assert graphs.capture_recompute(300) == len(pg.recompute_buckets(300)) == 7
    assert captured == [16, 32, 64, 128, 256, 288, 320]
    for after, before in zip(keys + values, original):
        assert torch.equal(after[1:], before[1:])
    # Two requests of different contexts, then three: the graphs captured at start.
    for blocks in (BATCH_BLOCKS[:2], BATCH_BLOCKS):
        items = [pg.PrefillItem(torch.arange(5), torch.arange(5) + 3 * b, 40 + 20 * b, torch.tensor(bl))
                 for b, bl in enumerate(blocks)]
        assert graphs.prefill_batch(items)
    assert len(captured) == 7 and set(graphs._entries) == {("prefill", r) for r in captured}
    # A context beyond max_context has no table here: left to the executor.
    assert not graphs.prefill_batch([pg.PrefillItem(torch.arange(2), torch.tensor([3, 120]), 121,
                                                    torch.tensor(BATCH_BLOCKS[0]))])


def test_interp_engine_start_captures_scoring_buckets_writing_only_the_null_block(interp, monkeypatch):
    """capture_scoring (engine start) runs each scoring bucket's pass once on padding
    only, smallest context first, up to its limit: no cache slot changes but the null
    block's, and a request meeting a captured bucket then replays it (no capture while
    serving) with the eager score."""
    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV

    keys, values = _layers(22, 16, 2, 32, seed=10)
    original = _clone(keys + values)
    ex = LayerwiseExecutor(Toy(4, 2, 32))
    graphs = pg.PassGraphs(ex, keys, values, 16, [1, 2], capture=True, max_context=100)
    captured = []
    monkeypatch.setattr(graphs, "_capture", lambda buf, kind: captured.append((kind, buf.batch)))
    assert pg.score_buckets(16, 100, 16) == [(16, 2048, b) for b in (1, 2, 4, 8, 16)]
    assert graphs.capture_scoring(16, limit=3) == 3
    assert captured == [("score", 1), ("score", 2), ("score", 4)]
    assert graphs.capture_scoring(16, limit=3) == 0  # already there
    for after, before in zip(keys + values, original):
        assert torch.equal(after[1:], before[1:])
    # Two requests of 9-token questions: the (16 rows, 2048 keys, 2 requests) bucket.
    ids = torch.arange(40, 49)
    items = [pg.ScoreItem(ids, 60, 57, torch.tensor(BATCH_BLOCKS[0])),
             pg.ScoreItem(ids + 1, 40, 37, torch.tensor(BATCH_BLOCKS[1]))]
    eager = [ex.score(it.ids, torch.arange(it.q0, it.q0 + 9), PagedKV(
        _clone(keys), _clone(values), it.block_ids, 16), it.context_len, [1, 2]) for it in items]
    got = graphs.score_batch(items)
    assert len(captured) == 3, "a bucket captured at start was captured again"
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_interp_capture_switch(interp, monkeypatch):
    """Graphs on CUDA unless KVFLOW_GRAPHS=0; off CUDA the passes always run eagerly."""
    import types

    import vllm_kvflow.blend.pipeline as pipeline
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV

    assert pipeline.capture_graphs(True) and not pipeline.capture_graphs(False)
    monkeypatch.setenv("KVFLOW_GRAPHS", "0")
    assert not pipeline.capture_graphs(True)
    monkeypatch.delenv("KVFLOW_GRAPHS")

    keys, values = _layers(4, 16, 2, 32, seed=5, num_layers=1)
    kv = PagedKV(keys, values, torch.tensor([1, 2]), 16)
    stub = types.SimpleNamespace(_graphs=None, executor=LayerwiseExecutor(Toy(4, 2, 32)),
                                 scoring_layers=[0], max_model_len=None)
    graphs = pipeline.BlendPipeline.pass_graphs_for(stub, kv)
    assert graphs is not None and not graphs.capture
    assert pipeline.BlendPipeline.pass_graphs_for(stub, kv) is graphs  # built once per cache



def test_interp_graphs_stop_at_the_cap(interp, monkeypatch, caplog):
    """Past MAX_GRAPHS captured graphs, a new size bucket is not captured (it runs
    eagerly): a server that sees every bucket stops paying captures."""
    import logging

    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    keys, values = _layers(10, 16, 2, 32, seed=6)
    graphs = pg.PassGraphs(LayerwiseExecutor(Toy(4, 2, 32)), keys, values, 16, [1], capture=True)
    buf = pg._Buffers.empty(16, 2048, 1, 16, "cpu", scores=False)
    monkeypatch.setattr(pg, "MAX_GRAPHS", 2)
    caplog.set_level(logging.INFO, logger="vllm_kvflow")
    # Below the cap a capture is attempted (on CPU it fails, is logged, and runs eagerly).
    graphs._entries[("prefill", 16, 2048, 1)] = (buf, object())
    assert graphs._capture(buf, "prefill") is None
    assert "capture failed" in caplog.text
    caplog.clear()
    graphs._entries[("prefill", 32, 2048, 1)] = (buf, object())  # two graphs: the cap
    assert graphs._capture(buf, "prefill") is None and graphs._capture(buf, "score") is None
    assert "capture failed" not in caplog.text
    assert caplog.text.count("further size buckets run eagerly") == 1  # logged once


def test_tensor_parallel_capture_runs_inside_vllms_graph_capture(monkeypatch):
    """Under TP the capture stream is the one of vLLM's graph_capture(), whose exit
    registers the captured all-reduce buffers with the other ranks; the context must be
    entered before and left after the capture. (CPU: vLLM's context is stood in for,
    since a CPU build has no custom all-reduce; the GPU TP-2 runs exercise the real one.)"""
    import contextlib
    import types

    pytest.importorskip("vllm")
    import vllm.distributed.parallel_state as ps

    from vllm_kvflow.patches import parallel

    events = []

    @contextlib.contextmanager
    def fake_graph_capture(device):
        events.append(("enter", device))
        yield types.SimpleNamespace(stream="vllm-capture-stream")
        events.append(("exit", device))

    monkeypatch.setattr(ps, "graph_capture", fake_graph_capture)
    monkeypatch.setattr(parallel, "tp_world_size", lambda: 2)
    with parallel.graph_capture_stream("cuda:1") as stream:
        assert stream == "vllm-capture-stream" and events == [("enter", "cuda:1")]
    assert events == [("enter", "cuda:1"), ("exit", "cuda:1")]


# Three requests with their own blocks (never block 0, the null block).
BATCH_BLOCKS = [[6, 2, 7, 9, 4, 3, 8], [11, 13, 12, 1, 14, 15, 5], [17, 16, 10, 18, 19, 20, 21]]


def test_interp_batched_score_equals_each_requests_eager_score(interp):
    """Three questions of different lengths and contexts in one pass (batch bucket 4,
    one padding request): each request's scores equal its own eager scoring."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, ScoreItem

    D, BS, NB, Hq, Hkv = 32, 16, 22, 8, 2
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    layers = [0, 2]
    keys, values = _layers(NB, BS, Hkv, D, seed=7)
    shapes = [(50, 6), (70, 17), (33, 1)]  # (context, question tokens)
    items, eager = [], []
    for (context, n), blocks in zip(shapes, BATCH_BLOCKS):
        ids = torch.arange(40, 40 + n) + context
        q0 = context + 3
        kv = PagedKV(_clone(keys), _clone(values), torch.tensor(blocks), BS)
        eager.append(ex.score(ids, torch.arange(q0, q0 + n), kv, context, layers))
        items.append(ScoreItem(ids, q0, context, torch.tensor(blocks)))
    graphs = PassGraphs(ex, keys, values, BS, layers)
    got = graphs.score_batch(items)
    assert [g.shape[0] for g in got] == [c for c, _ in shapes]
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert list(graphs._entries) == [("score", 32 * 4, 2048, 4)]  # 17 rows -> slots of 32


def test_interp_batched_recompute_equals_each_requests_eager_prefill(interp):
    """Three requests' selected tokens packed into one pass (padding rows and a padding
    request): every recomputed slot equals the request's own eager prefill, and nothing
    else changes but the null block."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, PrefillItem

    D, BS, NB, Hq, Hkv = 32, 16, 22, 4, 2
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    keys, values = _layers(NB, BS, Hkv, D, seed=8)
    original = _clone(keys + values)
    selections = [[3, 9, 10, 41, 57, 58], list(range(0, 90, 7)), [70]]
    reference = _clone(keys + values)
    L = len(keys)
    items, touched = [], torch.zeros(NB, BS, dtype=torch.bool)
    for selected, blocks in zip(selections, BATCH_BLOCKS):
        positions = torch.tensor(selected)
        ids = 7 * positions + len(selected)
        kv = PagedKV(reference[:L], reference[L:], torch.tensor(blocks), BS)
        ex.prefill(ids, positions, kv)  # in place in the shared reference caches
        items.append(PrefillItem(ids, positions, 95, torch.tensor(blocks)))
        for p in selected:
            touched[blocks[p // BS], p % BS] = True
    graphs = PassGraphs(ex, keys, values, BS, [1])
    assert graphs.prefill_batch(items)
    keep = ~touched
    keep[0] = False
    for got, want, before in zip(keys + values, reference, original):
        torch.testing.assert_close(got[touched], want[touched], rtol=1e-5, atol=1e-6)
        assert not torch.equal(got[touched], before[touched])
        assert torch.equal(got[keep], before[keep])
    (kind, rows), = graphs._entries  # one graph per row bucket, whatever the requests
    assert (kind, rows) == ("prefill", 32)  # 20 rows -> 32

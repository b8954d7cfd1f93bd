"""The scoring and recompute passes captured in CUDA graphs (blend/pass_graphs.py) equal
the eager passes on the GPU (no vLLM: a toy model stands in for the decoder layers;
tests/unit/test_pass_graphs_interpret.py has the padding checks on CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from toy_decoder import Toy  # noqa: E402

from gpu_waits import queued_without_waiting  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _to(toy, device, dtype):
    # Smaller weights than on CPU: 32 heads x 128 would otherwise saturate every softmax.
    toy.proj, toy.mix = (0.3 * toy.proj).to(device, dtype), (0.3 * toy.mix).to(device, dtype)

    embed = toy.embed
    toy.embed = lambda ids: embed(ids).to(dtype)
    return toy


def _setup(dtype, seed):
    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.paged import split_kv_cache

    torch.manual_seed(seed)
    Hq, Hkv, D, BS, NB = 32, 8, 128, 16, 700
    ex = LayerwiseExecutor(_to(Toy(Hq, Hkv, D, hidden=64), "cuda", dtype))
    raw = torch.randn(NB, BS, Hkv, 2 * D, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = split_kv_cache(raw, "flash", D)
    keys = [k] + [k.clone() for _ in range(2)]
    values = [v] + [v.clone() for _ in range(2)]
    block_ids = (torch.randperm(NB - 1) + 1)[:600].cuda()  # never the null block 0
    return ex, keys, values, block_ids, BS


def _clone(tensors):
    return [x.clone() for x in tensors]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captured_score_equals_eager_score(dtype):
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs

    ex, keys, values, block_ids, BS = _setup(dtype, seed=0)
    graphs = PassGraphs(ex, _clone(keys), _clone(values), BS, [1, 2])
    assert graphs.capture
    for context, n in ((5000, 23), (3100, 9), (9000, 40)):
        q0 = context + 4
        ids = torch.arange(100, 100 + n, device="cuda")
        kv = PagedKV(_clone(keys), _clone(values), block_ids, BS)
        eager = ex.score(ids, torch.arange(q0, q0 + n, device="cuda"),
                         kv, context, [1, 2])
        got = graphs.score(ids, q0, context, block_ids)
        assert got.shape == (context,)
        torch.testing.assert_close(got, eager, rtol=2e-2, atol=1e-4)
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captured_recompute_equals_eager_prefill(dtype):
    """Three requests through the recompute graphs, the second in the first's buckets
    (a replay with new inputs), against the executor's eager in-place prefill."""
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs

    ex, keys, values, block_ids, BS = _setup(dtype, seed=1)
    graphs = PassGraphs(ex, _clone(keys), _clone(values), BS, [1, 2])
    for context_end, n, seed in ((5000, 700, 0), (4800, 690, 1), (9000, 1300, 2)):
        gen = torch.Generator().manual_seed(seed)
        positions = torch.randperm(context_end, generator=gen)[:n].sort().values.cuda()
        ids = (positions * 7 + 3) % 1000
        before = [x[block_ids] for x in graphs.keys + graphs.values]
        kv = PagedKV([x.clone() for x in graphs.keys], [x.clone() for x in graphs.values],
                     block_ids, BS)
        ex.prefill(ids, positions, kv)
        assert graphs.prefill(ids, positions, context_end, block_ids)
        for eager, captured, old in zip(kv.keys + kv.values, graphs.keys + graphs.values, before):
            eager, captured = eager[block_ids].flatten(0, 1), captured[block_ids].flatten(0, 1)
            torch.testing.assert_close(captured[positions], eager[positions], rtol=2e-2, atol=2e-2)
            rest = torch.ones(eager.shape[0], dtype=torch.bool, device="cuda")
            rest[positions] = False
            assert torch.equal(captured[rest], old.flatten(0, 1)[rest])
    assert len(graphs._entries) == 2, "the second request should replay the first's graph"
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"


def test_segment_load_equals_gathered_load():
    """The in-place segment load (the engine's GPU write path) against the gathered
    multi-layer load, bf16, FLASH_ATTN layout, 32 layers, chunks of uneven length."""
    from vllm_kvflow.kernels.chunk_load import (layer_offsets, load_chunk_kv_layers,
                                                load_chunk_kv_segments)

    torch.manual_seed(1)
    L, H, D, BS, NB, dt = 32, 8, 128, 16, 400, torch.bfloat16
    freqs = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(torch.arange(8192, dtype=torch.float64), freqs)
    rope = torch.cat([ang.cos(), ang.sin()], -1).float().cuda()
    chunks = [(torch.randn(L, n, H, D, device="cuda", dtype=dt),
               torch.randn(L, n, H, D, device="cuda", dtype=dt)) for n in (97, 130, 5, 260)]
    segments = [(k, v, skip, k.shape[1] - skip) for (k, v), skip in zip(chunks, (0, 17, 0, 1))]
    T = sum(s[3] for s in segments)
    slots = torch.randperm(NB * BS, device="cuda")[:T]
    delta = torch.randint(-4000, 4000, (T,), device="cuda")
    out = []
    for in_place in (True, False):
        caches = [torch.full((NB, BS, H, 2 * D), float("nan"), device="cuda", dtype=dt) for _ in range(L)]
        keys, values = [c[..., :D] for c in caches], [c[..., D:] for c in caches]
        if in_place:
            load_chunk_kv_segments(segments, keys, values, slots, delta, rope, D, True)
        else:
            k_src = torch.cat([k[:, s:] for k, _, s, _ in segments], 1)
            v_src = torch.cat([v[:, s:] for _, v, s, _ in segments], 1)
            load_chunk_kv_layers(k_src, v_src, keys, values, slots, delta, rope, D, True,
                                 offsets=(layer_offsets(keys), layer_offsets(values)))
        out.append(torch.stack(caches))
    assert torch.equal(out[0].isnan(), out[1].isnan())
    assert torch.equal(out[0].nan_to_num(0), out[1].nan_to_num(0))  # same kernel math


def test_a_new_requests_segment_load_never_waits_for_the_gpu():
    """The load of a request's chunks into its paged blocks (the engine's GPU write path,
    PagedKV.load_rotated_segments on a fresh PagedKV, whose per-layer offsets are built
    on first use) queues its copies and kernel without a host sync: behind a long GPU
    job it returns while the job still runs, and CUDA's sync check finds no
    synchronizing call. It once copied the offsets with a blocking copy, which on an
    H200 held every step that started a load for ~30 ms (suite.sh probeprofile)."""
    from vllm_kvflow.blend.host_ints import device_ints
    from vllm_kvflow.blend.paged import PagedKV

    torch.manual_seed(2)
    L, H, D, BS, NB, dt = 4, 8, 128, 16, 64, torch.bfloat16
    caches = [torch.zeros(NB, BS, H, 2 * D, device="cuda", dtype=dt) for _ in range(L)]
    keys, values = [c[..., :D] for c in caches], [c[..., D:] for c in caches]
    rope = torch.randn(4096, D, device="cuda")
    chunks = [(torch.randn(L, n, H, D, device="cuda", dtype=dt),
               torch.randn(L, n, H, D, device="cuda", dtype=dt)) for n in (40, 25)]
    segments = [(k, v, 0, k.shape[1]) for k, v in chunks]
    T = sum(s[3] for s in segments)
    positions = torch.arange(3, 3 + T, device="cuda")
    delta = torch.full((T,), 3, device="cuda")

    def load():
        paged = PagedKV(keys, values, device_ints(list(range(1, 9)), "cuda"), BS)
        paged.load_rotated_segments(segments, positions, delta, rope, D, True)

    load()  # compiles the kernel: a first launch may wait
    assert queued_without_waiting(load), "the load waited for the GPU"
    first = caches[0].view(-1, H, 2 * D)[BS + 3:BS + 3 + 40, :, D:]
    assert torch.equal(first, chunks[0][1][0])  # values land unrotated at their slots


def test_load_timer_does_not_wait_for_the_gpu():
    """The load's phases are timed by CUDA events: leaving a phase does not synchronize
    (vLLM's forward can be launched while the load's kernels run), and the time read
    afterwards covers the GPU work."""
    from vllm_kvflow.blend.pipeline import _Timer

    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    timer = _Timer(torch.device("cuda"))
    with timer("recompute"):
        for _ in range(50):
            a = a @ a.T / 64.0
    _, _, end = timer.spans[-1]
    assert not end.query(), "the phase waited for the GPU"
    seconds = timer.resolve()["recompute"]
    assert end.query() and seconds > 1e-3


def test_replayed_passes_never_wait_for_the_gpu():
    """Once their buckets are captured, the scoring and recompute passes queue their work
    without a host sync (inputs on the device): behind a long GPU job, both return while
    it still runs, and CUDA's sync check finds no synchronizing call in them."""
    from vllm_kvflow.blend.pass_graphs import PassGraphs

    ex, keys, values, block_ids, BS = _setup(torch.bfloat16, seed=3)
    graphs = PassGraphs(ex, keys, values, BS, [1, 2])
    question = torch.arange(100, 120, device="cuda")
    positions = torch.randperm(5000, device="cuda")[:700].sort().values
    recompute_ids = (positions * 7 + 3) % 1000

    def both():
        graphs.score(question, 5004, 5000, block_ids)
        assert graphs.prefill(recompute_ids, positions, 5000, block_ids)

    both()  # captures the two buckets
    assert queued_without_waiting(both), "the passes waited for the GPU"
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_captured_batched_passes_equal_each_requests_eager_pass(dtype):
    """Five requests, each with its own blocks, scored and recomputed in captured batched
    passes (batch bucket 8) against each request's own eager pass; a second batch of
    other sizes in the same buckets replays the graphs, and never waits for the GPU."""
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, PrefillItem, ScoreItem

    ex, keys, values, block_ids, BS = _setup(dtype, seed=4)
    per = block_ids.numel() // 5
    blocks = [block_ids[i * per:(i + 1) * per] for i in range(5)]  # 120 blocks = 1920 slots each
    graphs = PassGraphs(ex, _clone(keys), _clone(values), BS, [1, 2])
    for round_ in range(2):
        gen = torch.Generator().manual_seed(round_)
        contexts = [int(x) for x in torch.randint(900, 1800, (5,), generator=gen)]
        lengths = [int(x) for x in torch.randint(3, 30, (5,), generator=gen)]
        scores, prefills = [], []
        for b, (context, n) in enumerate(zip(contexts, lengths)):
            ids = torch.arange(10 * b, 10 * b + n, device="cuda")
            kv = PagedKV([x.clone() for x in graphs.keys], [x.clone() for x in graphs.values], blocks[b], BS)
            eager = ex.score(ids, torch.arange(context + 2, context + 2 + n, device="cuda"), kv, context, [1, 2])
            scores.append((ScoreItem(ids, context + 2, context, blocks[b]), eager))
        got = graphs.score_batch([item for item, _ in scores])
        for g, (_, eager) in zip(got, scores):
            torch.testing.assert_close(g, eager, rtol=2e-2, atol=1e-4)
        reference = [x.clone() for x in graphs.keys + graphs.values]
        L = len(graphs.keys)
        for b, context in enumerate(contexts):
            positions = torch.randperm(context, generator=gen)[:150 + 20 * b].sort().values.cuda()
            ids = (positions * 7 + b) % 1000
            ex.prefill(ids, positions, PagedKV(reference[:L], reference[L:], blocks[b], BS))
            prefills.append(PrefillItem(ids, positions, context, blocks[b]))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if round_ else 0)
        try:
            assert graphs.prefill_batch(prefills)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for captured, want in zip(graphs.keys + graphs.values, reference):
            torch.testing.assert_close(captured[block_ids], want[block_ids], rtol=2e-2, atol=2e-2)
    assert {k[3] for k in graphs._entries if k[0] == "score"} == {8}
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"


def test_engine_start_capture_serves_every_later_recompute():
    """capture_recompute (engine start) captures every recompute bucket up to the budget;
    recomputes of 1 to 20 requests, of any contexts, then replay those graphs (no new
    entry) and equal each request's eager prefill."""
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, PrefillItem, recompute_buckets

    ex, keys, values, block_ids, BS = _setup(torch.bfloat16, seed=5)
    graphs = PassGraphs(ex, _clone(keys), _clone(values), BS, [1, 2])
    assert graphs.capture_recompute(512) == len(recompute_buckets(512))
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"
    entries = set(graphs._entries)
    per = block_ids.numel() // 20
    blocks = [block_ids[i * per:(i + 1) * per] for i in range(20)]  # 30 blocks = 480 slots each
    gen = torch.Generator().manual_seed(5)
    for count in (1, 7, 20):
        reference = [x.clone() for x in graphs.keys + graphs.values]
        L = len(graphs.keys)
        items = []
        for b in range(count):
            context = int(torch.randint(100, 480, (1,), generator=gen))
            positions = torch.randperm(context, generator=gen)[:max(1, 480 // count // 2)].sort().values.cuda()
            ids = (positions * 7 + b) % 1000
            ex.prefill(ids, positions, PagedKV(reference[:L], reference[L:], blocks[b], BS))
            items.append(PrefillItem(ids, positions, context, blocks[b]))
        assert graphs.prefill_batch(items)
        for captured, want in zip(graphs.keys + graphs.values, reference):
            torch.testing.assert_close(captured[block_ids], want[block_ids], rtol=2e-2, atol=2e-2)
    assert set(graphs._entries) == entries, "serving met a bucket the engine start did not capture"


def test_engine_start_scoring_capture_serves_later_scores():
    """capture_scoring (engine start) captures the scoring graphs of short questions for
    every context and batch bucket; batches of 1 to 16 requests with questions of up to
    64 tokens then replay them (no new entry) and equal each request's eager score, and
    no cache slot but the null block's changed at the capture."""
    from vllm_kvflow.blend.paged import PagedKV
    from vllm_kvflow.blend.pass_graphs import PassGraphs, ScoreItem, score_buckets

    ex, keys, values, block_ids, BS = _setup(torch.bfloat16, seed=6)
    graphs = PassGraphs(ex, _clone(keys), _clone(values), BS, [1, 2], max_context=9600)
    before = [x.clone() for x in graphs.keys + graphs.values]
    assert graphs.capture_scoring(64, limit=100) == len(score_buckets(64, 9600, BS)) == 60
    assert all(graph is not None for _, graph in graphs._entries.values()), "capture failed"
    for after, want in zip(graphs.keys + graphs.values, before):
        torch.testing.assert_close(after[1:], want[1:], rtol=0, atol=0)
    entries = set(graphs._entries)
    gen = torch.Generator().manual_seed(6)
    for count in (1, 5, 16):
        per = block_ids.numel() // count
        items, eager = [], []
        for b in range(count):
            blocks = block_ids[b * per:(b + 1) * per]
            context = int(torch.randint(100, min(per * BS, 9000) - 70, (1,), generator=gen))
            n = int(torch.randint(1, 65, (1,), generator=gen))
            ids = torch.arange(10 * b, 10 * b + n, device="cuda") % 1000
            kv = PagedKV([x.clone() for x in graphs.keys], [x.clone() for x in graphs.values], blocks, BS)
            eager.append(ex.score(ids, torch.arange(context + 2, context + 2 + n, device="cuda"), kv,
                                  context, [1, 2]))
            items.append(ScoreItem(ids, context + 2, context, blocks))
        for got, want in zip(graphs.score_batch(items), eager):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
    assert set(graphs._entries) == entries, "serving met a scoring bucket the engine start did not capture"

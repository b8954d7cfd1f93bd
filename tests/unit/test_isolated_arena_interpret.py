"""Isolated computes on the static paged arena (blend/isolated_arena.py) against the same
computes alone in private buffers, under TRITON_INTERPRET=1.

On CPU nothing is captured: the arena's passes run eagerly on the padded buffers the
graphs would replay, so this checks what the arena adds: scattered pages as a block
table, the null page under the padding rows, several computes per pass, a compute
continued in a later pass, a piece longer than the largest pass cut into slices, more
computes than one pass holds, and pages handed back. The capture itself is checked on
the GPU (tests/gpu/test_pass_graphs_gpu.py).
"""
from __future__ import annotations

import gc

import pytest
import torch

from interpreter_child import require_interpreter_child, run_interpreter_child
from toy_decoder import Toy, token_ids

Hq, Hkv, D = 4, 2, 32


def test_isolated_arena_under_triton_interpreter():
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_isolated_arena_under_triton_interpreter")


def _arena(ex, rows, **kw):
    from vllm_kvflow.blend.isolated_arena import IsolatedArena

    return IsolatedArena(ex, 3, rows, Hkv, D, torch.float32, "cpu", capture=False, **kw)


def _alone(ex, ids):
    """The reference: the whole sequence in one eager pass over a private buffer."""
    from vllm_kvflow.blend.executor import RowGroup
    from vllm_kvflow.blend.paged import DenseKV

    buf = DenseKV.empty(3, ids.numel(), Hkv, D, torch.float32, "cpu")
    ex.prefill_groups([RowGroup(ids, torch.arange(ids.numel()), buf)])
    return buf.copy_rows(0, ids.numel())


def _check(arena_kv, ex, ids):
    keys, values = arena_kv.copy_rows(0, ids.numel())
    ref_keys, ref_values = _alone(ex, ids)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)


def test_interp_arena_computes_in_slices_equal_private_computes(interp):
    """Lengths within a page and across pages, on scattered pages (a freed hole reused),
    computed as first halves in one pass and the rest in the next."""
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    arena = _arena(ex, 200)
    hole = arena.allocate(40)  # pages 1-3, handed back below: the next computes get a gap
    lengths = [5, 16, 37]
    kvs = [arena.allocate(n) for n in lengths]
    hole.release()
    kvs.append(arena.allocate(33))
    lengths.append(33)
    # Pages 1-3 again, handed out in reverse: a table that runs backwards.
    assert kvs[-1].pages == [3, 2, 1] and 0 not in sum((kv.pages for kv in kvs), [])
    seqs = [token_ids(n, seed) for seed, n in enumerate(lengths)]
    halves = [n // 2 for n in lengths]
    arena.advance([(kv, ids[:h], 0) for kv, ids, h in zip(kvs, seqs, halves)])
    arena.advance([(kv, ids[h:], h) for kv, ids, h in zip(kvs, seqs, halves)])
    for kv, ids in zip(kvs, seqs):
        _check(kv, ex, ids)


def test_interp_passes_are_cut_to_the_largest_bucket_and_the_batch(interp, monkeypatch):
    """A piece longer than the largest pass runs as consecutive slices in later passes;
    more computes than one pass holds run in several passes."""
    import vllm_kvflow.blend.isolated_arena as ia
    import vllm_kvflow.blend.pass_graphs as pg
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    monkeypatch.setattr(pg, "PREFILL_ROWS", (16, 32))
    monkeypatch.setattr(ia, "PREFILL_ROWS", (16, 32))
    monkeypatch.setattr(pg, "RECOMPUTE_BATCH", 3)
    monkeypatch.setattr(ia, "RECOMPUTE_BATCH", 3)
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    arena = _arena(ex, 300)
    passes = []
    real = arena.graphs.prefill_batch
    monkeypatch.setattr(arena.graphs, "prefill_batch",
                        lambda items: passes.append([(int(i.positions[0]), i.ids.numel()) for i in items])
                        or real(items))
    lengths = [70, 3, 4, 5, 6]
    kvs = [arena.allocate(n) for n in lengths]
    seqs = [token_ids(n, 10 + seed) for seed, n in enumerate(lengths)]
    arena.advance([(kv, ids, 0) for kv, ids in zip(kvs, seqs)])
    assert passes == [[(0, 32)], [(32, 32)], [(64, 6), (0, 3), (0, 4)], [(0, 5), (0, 6)]]
    for kv, ids in zip(kvs, seqs):
        _check(kv, ex, ids)


def test_interp_pipeline_uses_the_arena_where_it_has_room(interp):
    """BlendPipeline: computes that fit take arena pages, the rest shared private buffers;
    the entries are the same either way, and the arena's pages come back."""
    from types import SimpleNamespace

    from vllm_kvflow.blend.executor import LayerwiseExecutor
    from vllm_kvflow.blend.isolated_arena import ArenaKV
    from vllm_kvflow.blend.paged import DenseKV
    from vllm_kvflow.blend.pipeline import BlendPipeline, IsolatedCompute

    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    pipe = BlendPipeline(ex, None, SimpleNamespace(scoring_layers=None, seed=0), "toy", (7,))
    items = [(tuple(int(t) for t in token_ids(n, 20 + n)), (7,)) for n in (30, 50, 12)]
    without = pipe.compute_isolated_many(items)
    pipe._arena = _arena(ex, 96)  # room for the first two (2 + 4 pages), not the third
    free = pipe._arena.free_rows
    runs = pipe.start_isolated([IsolatedCompute(None, t, s, True) for t, s in items])
    assert [type(r.kv) for r in runs] == [ArenaKV, ArenaKV, DenseKV]
    pipe.advance_isolated([(r, r.rows_left) for r in runs])
    with_arena = [r.entry() for r in runs]
    assert pipe._arena.free_rows == free  # entry() released the pages
    for a, b in zip(with_arena, without):
        assert a.token_ids == b.token_ids and a.local_start == b.local_start == 1
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_arena_pages_are_handed_out_once_and_come_back():
    """Page 0 is never handed out; a compute that does not fit gets None; release and
    collection of a dropped compute both return the pages, once."""
    from vllm_kvflow.blend.isolated_arena import PAGE, IsolatedArena

    arena = IsolatedArena(None, 2, 4 * PAGE, 1, 8, torch.float32, "cpu", capture=False)
    assert arena.free_rows == 4 * PAGE and arena.keys.shape[1] == 5
    a = arena.allocate(PAGE + 1)
    assert a.pages == [1, 2] and arena.allocate(3 * PAGE) is None
    b = arena.allocate(2 * PAGE)
    assert b.pages == [3, 4] and arena.free_rows == 0
    a.release()
    a.release()  # once only
    assert arena.free_rows == 2 * PAGE
    del b
    gc.collect()
    assert sorted(arena._free) == [1, 2, 3, 4]


def test_arena_rows_follow_the_step_budget_within_bounds():
    from vllm_kvflow.blend.isolated_arena import MAX_ARENA_ROWS, arena_rows
    from vllm_kvflow.blend.pass_graphs import PREFILL_ROWS

    assert arena_rows(0) == arena_rows(256) == PREFILL_ROWS[1]
    assert arena_rows(1536) == 6144
    assert arena_rows(100_000) == MAX_ARENA_ROWS

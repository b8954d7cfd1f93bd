"""Isolated computes in one shared buffer (blend/dense_batch.py) against the same computes
in private buffers, one write and one attention launch each.

The batched path runs where the kernels run, so it is checked under TRITON_INTERPRET=1
(a child pytest): groups of several lengths (within a page, across pages), a pass that
continues slices begun in an earlier pass, a private buffer between two shared runs
(three attention units), a lone shared buffer, and more groups than one launch may
hold (MAX_SEQS).
"""
from __future__ import annotations

import pytest
import torch

from interpreter_child import require_interpreter_child, run_interpreter_child
from toy_decoder import Toy, token_ids


def test_dense_batch_under_triton_interpreter():
    run_interpreter_child(__file__)


@pytest.fixture(scope="module")
def interp():
    require_interpreter_child("test_dense_batch_under_triton_interpreter")


def _groups(spans, bufs, seqs):
    """RowGroups of rows [a, b) of each sequence into its buffer."""
    from vllm_kvflow.blend.executor import RowGroup

    return [RowGroup(ids[a:b], torch.arange(a, b), buf, length=b)
            for ids, (a, b), buf in zip(seqs, spans, bufs)]


def _private(n, Hkv, D):
    from vllm_kvflow.blend.paged import DenseKV

    return DenseKV.empty(3, n, Hkv, D, torch.float32, "cpu")


# Two launches: the reference checks the chunks around the launch boundary (each chunk is
# computed alone in it, so a subset is as good a check, at a tenth of the interpreter time).
@pytest.mark.parametrize("lengths,checked", [([5, 16, 37], [0, 1, 2]), ([4] * 33, [0, 30, 31, 32])],
                         ids=["pages", "two-launches"])
def test_interp_shared_buffers_equal_private_buffers_in_slices(interp, lengths, checked):
    from vllm_kvflow.blend.dense_batch import SharedBatch, attention_plan, dense_kv_many
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    Hq, Hkv, D = 4, 2, 32
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    seqs = [token_ids(n, seed) for seed, n in enumerate(lengths)]
    shared = dense_kv_many(3, lengths, Hkv, D, torch.float32, "cpu")
    private = [_private(n, Hkv, D) for n in lengths]
    halves = [n // 2 for n in lengths]
    for spans in (list(zip([0] * len(lengths), halves)), list(zip(halves, lengths))):
        groups = _groups(spans, shared, seqs)
        plan = attention_plan(groups, [(0, 0)] * len(groups))
        assert len(plan) == 1 and isinstance(plan[0], SharedBatch)
        ex.prefill_groups(groups)
        for i, g in enumerate(_groups(spans, private, seqs)):  # the reference: alone, own buffer
            if i in checked:
                ex.prefill_groups([g])
    for i in checked:
        torch.testing.assert_close(shared[i].keys, private[i].keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared[i].values, private[i].values, rtol=1e-5, atol=1e-6)


def test_interp_a_private_buffer_between_shared_runs_splits_the_plan(interp):
    from vllm_kvflow.blend.dense_batch import OwnBuffer, SharedBatch, attention_plan, dense_kv_many
    from vllm_kvflow.blend.executor import LayerwiseExecutor

    Hq, Hkv, D = 4, 2, 32
    ex = LayerwiseExecutor(Toy(Hq, Hkv, D))
    lengths = [20, 9, 30, 17, 25]
    seqs = [token_ids(n, seed) for seed, n in enumerate(lengths)]
    a = dense_kv_many(3, lengths[:2], Hkv, D, torch.float32, "cpu")
    b = dense_kv_many(3, lengths[3:], Hkv, D, torch.float32, "cpu")
    bufs = a + [_private(lengths[2], Hkv, D)] + b
    groups = _groups([(0, n) for n in lengths], bufs, seqs)
    plan = attention_plan(groups, [(0, 0)] * len(groups))
    assert [type(u) for u in plan] == [SharedBatch, OwnBuffer, SharedBatch]
    assert [type(u) for u in attention_plan(groups[:1], [(0, 0)])] == [SharedBatch]  # alone too
    ex.prefill_groups(groups)
    for n, ids, buf in zip(lengths, seqs, bufs):
        alone = _private(n, Hkv, D)
        ex.prefill_groups(_groups([(0, n)], [alone], [ids]))
        torch.testing.assert_close(buf.keys, alone.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buf.values, alone.values, rtol=1e-5, atol=1e-6)


def test_arena_order_puts_each_arenas_buffers_together_in_first_appearance_order():
    from vllm_kvflow.blend.dense_batch import arena_order, dense_kv_many

    a = dense_kv_many(1, [3, 4], 1, 8, torch.float32, "cpu")
    b = dense_kv_many(1, [5, 6], 1, 8, torch.float32, "cpu")
    own = _private(2, 1, 8)
    items = [("a0", a[0]), ("b0", b[0]), ("own", own), ("a1", a[1]), ("b1", b[1])]
    assert [n for n, _ in arena_order(items, lambda t: t[1])] == ["a0", "a1", "b0", "b1", "own"]


def test_shared_slices_start_on_pages_and_do_not_overlap():
    from vllm_kvflow.blend.dense_batch import PAGE, dense_kv_many

    bufs = dense_kv_many(2, [5, 16, 17, 1], 2, 8, torch.float32, "cpu")
    assert [b.offset for b in bufs] == [0, PAGE, 2 * PAGE, 4 * PAGE]
    assert all(b.keys.shape[1] == n for b, n in zip(bufs, [5, 16, 17, 1]))
    for i, b in enumerate(bufs):
        b.keys.fill_(i)
    assert [int(b.keys.max()) for b in bufs] == [0, 1, 2, 3]  # no slice overwrote another

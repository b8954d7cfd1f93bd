"""benchmarks/ceiling_anatomy.py's bookkeeping: where each candidate sits (offset inside
its chunk, glue or chunk, early or late chunk) and the shares of a selector's picks."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location(
    "ceiling_anatomy", Path(__file__).resolve().parents[2] / "benchmarks" / "ceiling_anatomy.py")
anatomy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(anatomy)


def _question():
    # Three chunks at 1-20, 22-41, 43-62 with one glue token between them; the first
    # chunk sits where it was computed, so it is no candidate.
    chunks = [(1, 21), (22, 42), (43, 63)]
    spans = [(21, 22), (22, 42), (42, 43), (43, 63)]
    candidates = torch.tensor([p for s, e in spans for p in range(s, e)])
    return SimpleNamespace(chunks=chunks, candidates=candidates,
                           blend=SimpleNamespace(candidate_spans=spans))


def test_places_give_offsets_inside_chunks_and_mark_glue():
    q = _question()
    places = anatomy.token_places(q)
    cand = q.candidates.tolist()
    at = {p: i for i, p in enumerate(cand)}
    assert places["offset"][at[22]] == 0 and places["offset"][at[41]] == 19
    assert places["offset"][at[43]] == 0 and bool(places["chunk"][at[43]])
    assert not places["chunk"][at[21]] and not places["chunk"][at[42]]
    assert places["where"][at[30]] == 0.5 and places["where"][at[50]] == 1.0  # 2nd, 3rd of 3
    assert places["where"][at[21]] == -1.0


def test_shares_of_the_picks():
    q = _question()
    places = anatomy.token_places(q)
    cand = q.candidates.tolist()
    picks = np.isin(cand, [21, 43, 44, 60])  # glue, first and second token, offset 17
    got = anatomy.shares(picks, places)
    assert got["glue"] == 0.25 and got["offset first"] == 0.25 and got["offset 2-4"] == 0.25
    assert got["offset 17+"] == 0.25 and got["late chunks (last third)"] == 0.75
    assert got["early chunks (first third)"] == 0.0


def test_spearman_of_a_monotone_pair_is_one():
    a = np.array([0.1, 0.5, 0.2, 0.9])
    assert abs(anatomy._spearman(a, 3 * a + 1) - 1.0) < 1e-12
    assert np.isnan(anatomy._spearman(a, np.ones(4)))


def test_ties_take_their_mean_rank():
    assert anatomy._ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]

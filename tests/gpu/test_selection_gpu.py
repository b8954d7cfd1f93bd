"""The selectors on the GPU pick what they pick on the CPU, and those that serve under
load queue their work without making the host wait for the GPU (a wait there holds up
the step's forward: README, "The slow steps found")."""
from __future__ import annotations

import pytest
import torch

from gpu_waits import queued_without_waiting
from vllm_kvflow.blend.selection import METHODS, SelectionInput, select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The baselines and the diagnostic are left out: `random` draws on the host generator,
# `oracle-kv` costs a full prefill anyway.
SERVING = sorted(name for name, m in METHODS.items()
                 if m.select is not None and m.recomputes and name not in ("random", "oracle-kv"))


def _selection(name, device):
    """select(name, ...) on fixed spans and random integer signals (ties included), on
    device."""
    gen = torch.Generator().manual_seed(0)
    chunks, start = [], 1
    for n in (31, 2, 57, 2, 44, 2, 63):  # chunks with separators between them
        chunks.append((start, start + n))
        start += n
    cand = torch.cat([torch.arange(s, e) for s, e in chunks])
    signal = tuple(torch.randint(0, 50, (start,), generator=gen).float().to(device)
                   for _ in METHODS[name].signals)
    inp = SelectionInput(cand.to(device), chunks, budget=37,
                         signal=signal[0] if len(signal) == 1 else (signal or None))
    return lambda: select(name, inp)


@pytest.mark.parametrize("name", SERVING)
def test_a_selector_picks_the_same_on_the_gpu(name):
    assert _selection(name, "cpu")().tolist() == _selection(name, "cuda")().cpu().tolist()


@pytest.mark.parametrize("name", SERVING)
def test_a_selector_never_waits_for_the_gpu(name):
    run = _selection(name, "cuda")
    run()  # first use: lazy CUDA initialisation of each op is not what is measured
    assert queued_without_waiting(run), f"{name} waited for the GPU"

"""Whether a piece of blend work makes the host wait for the GPU (a wait there holds up
the step's forward: README, "The slow steps found")."""
from __future__ import annotations

import torch


def queued_without_waiting(fn) -> bool:
    """Run fn() behind a long GPU job, with torch's sync check set to raise on any
    synchronizing call; whether it returned while the job still ran."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(50):  # ~tens of ms of GPU work, long beside the host's microseconds
        a = a @ a.T / 64.0
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    done = torch.cuda.Event()
    done.record()
    returned_first = not done.query()
    torch.cuda.synchronize()
    return returned_first

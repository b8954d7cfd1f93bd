"""CUDA streams that no other code in the process holds: one for kvflow's graph captures,
one for the blend work beside vLLM's (blend_stream "side" and "background").

Why not torch.cuda.Stream(): it hands out streams from a pool of 32 per priority,
round-robin, so two callers easily get the same stream; vLLM captures its forward's
graphs on pooled streams too. PyTorch keys cuBLAS workspaces by stream, and a captured
graph keeps the workspace of the stream it was captured on (pytorch/pytorch#193402
describes the same sharing). So a kvflow graph captured on the stream vLLM captured on
shares a workspace with vLLM's forward graphs. On vLLM's stream ("main") the two never
run at once. On a blend stream of their own ("side", "background") they do, and
split-K GEMMs that keep partial sums and counters in that workspace then read each
other's: the suspected cause of the GPU hang measured there (both streams stopped with
no error; README, "Under load"). A stream of our own has a workspace of its own; with
it, the runs that had hung went clean (about 1,800 infoflow requests on "side").

The same keying has a second edge: PyTorch frees a stream's cuBLAS workspaces when a
graph captured on it is destroyed (pytorch/pytorch#175276), while every other graph
captured there still points at them. All of kvflow's graphs share the capture stream,
so none may ever be destroyed, a failed capture's included: keep_alive holds them for
the process's life. A server drops none but a failed capture's; a test process keeps the
graphs of its finished tests, with their memory pools.

The stream comes from cudaStreamCreateWithFlags (non-blocking, like PyTorch's own) in
the CUDA runtime PyTorch has loaded, wrapped as a torch.cuda.ExternalStream; where
that runtime cannot be found (a static build), a pooled stream of the given priority.
"""
from __future__ import annotations

import ctypes
import logging
import os

import torch

logger = logging.getLogger("vllm_kvflow")

_NON_BLOCKING = 0x01  # cudaStreamNonBlocking: no implicit sync with the legacy stream
_made: dict[tuple[str, int], torch.cuda.Stream] = {}


def loaded_cudart_path(maps: str = "/proc/self/maps") -> str | None:
    """The CUDA runtime library this process has loaded (PyTorch's), if any."""
    try:
        with open(maps) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libcudart.so"):
                    return fields[-1]
    except OSError:
        return None
    return None


def _create_raw(device: torch.device) -> int:
    lib = ctypes.CDLL(loaded_cudart_path() or "libcudart.so")
    handle = ctypes.c_void_p()
    with torch.cuda.device(device):
        err = lib.cudaStreamCreateWithFlags(ctypes.byref(handle), ctypes.c_uint(_NON_BLOCKING))
    if err != 0 or not handle.value:
        raise RuntimeError(f"cudaStreamCreateWithFlags returned {err}")
    return handle.value


_kept: list = []


def keep_alive(graph):
    """graph, held until the process ends (see above); returned for chaining."""
    _kept.append(graph)
    return graph


def private_stream(device, purpose: str, fallback_priority: int = 0) -> torch.cuda.Stream:
    """The process's own stream for `purpose` on device, made once (kept for the
    process's life, as graphs captured on it keep its workspace)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (purpose, index)
    if key not in _made:
        device = torch.device("cuda", index)
        try:
            _made[key] = torch.cuda.ExternalStream(_create_raw(device), device=device)
        except Exception as e:  # noqa: BLE001 - a pooled stream still works where not shared
            logger.warning("kvflow: no private CUDA stream for %s (%s); using a pooled one, whose "
                           "cuBLAS workspace other code may share", purpose, e)
            _made[key] = torch.cuda.Stream(device=device, priority=fallback_priority)
    return _made[key]

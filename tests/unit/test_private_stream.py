"""blend/private_stream.py off the GPU: the CUDA runtime is found among the loaded
libraries, a stream is made once per purpose and device, and where none can be made a
pooled one of the given priority stands in (with a warning). tests/gpu checks the real
streams."""
from __future__ import annotations

import logging

import pytest


def test_loaded_cudart_is_found_in_the_process_maps(tmp_path):
    from vllm_kvflow.blend.private_stream import loaded_cudart_path

    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f02-7f03 rw-p 00000000 00:00 0\n"
        "7f04-7f05 r-xp 00000000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.13\n")
    assert loaded_cudart_path(str(maps)) == "/venv/nvidia/cuda_runtime/lib/libcudart.so.13"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    assert loaded_cudart_path(str(maps)) is None
    assert loaded_cudart_path(str(tmp_path / "missing")) is None


@pytest.fixture
def fake_cuda(monkeypatch):
    import torch

    import vllm_kvflow.blend.private_stream as ps

    monkeypatch.setattr(ps, "_made", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    made = []

    class External:
        def __init__(self, handle, device):
            made.append(("external", handle, str(device)))

    class Pooled:
        def __init__(self, device, priority):
            made.append(("pooled", priority, str(device)))

    monkeypatch.setattr(torch.cuda, "ExternalStream", External)
    monkeypatch.setattr(torch.cuda, "Stream", Pooled)
    return ps, made


def test_one_stream_per_purpose_and_device(fake_cuda, monkeypatch):
    ps, made = fake_cuda
    handles = iter(range(100, 200))
    monkeypatch.setattr(ps, "_create_raw", lambda device: next(handles))
    a = ps.private_stream("cuda", "capture")
    assert ps.private_stream("cuda:0", "capture") is a  # made once
    b = ps.private_stream("cuda:0", "blend")
    c = ps.private_stream("cuda:1", "blend")
    assert len({id(a), id(b), id(c)}) == 3
    assert made == [("external", 100, "cuda:0"), ("external", 101, "cuda:0"), ("external", 102, "cuda:1")]


def test_a_pooled_stream_stands_in_where_none_can_be_made(fake_cuda, monkeypatch, caplog):
    ps, made = fake_cuda

    def fail(device):
        raise OSError("libcudart.so: cannot open shared object file")

    monkeypatch.setattr(ps, "_create_raw", fail)
    caplog.set_level(logging.WARNING, logger="vllm_kvflow")
    ps.private_stream("cuda", "capture", fallback_priority=-1)
    assert made == [("pooled", -1, "cuda:0")]
    assert "no private CUDA stream for capture" in caplog.text


def test_kept_graphs_are_never_destroyed():
    """A kvflow graph is never destroyed (PyTorch would free the cuBLAS workspace that
    every other graph captured on the same stream uses): keep_alive holds it."""
    import gc
    import weakref

    from vllm_kvflow.blend.private_stream import keep_alive

    class Graph:
        pass

    graph = Graph()
    ref = weakref.ref(graph)
    assert keep_alive(graph) is graph
    del graph
    gc.collect()
    assert ref() is not None

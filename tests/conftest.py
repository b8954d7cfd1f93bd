import importlib.util
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")
    config.addinivalue_line("markers", "engine: drives the real vLLM engine on real weights")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: one thread runs them fastest, and on a busy machine
    extra OpenMP threads only spin (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """redis-server (or valkey-server) and the redis package, for remote-tier tests:
    skipped without them, except under CI, which must run these tests."""
    from vllm_kvflow.redis_server import MISSING, find_binary

    binary = find_binary()
    why = MISSING if binary is None else None
    if why is None and importlib.util.find_spec("redis") is None:
        why = "the redis package is not installed (scripts/install.sh pins it)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the remote-tier tests: {why}")
        pytest.skip(why)
    return binary


@pytest.fixture
def redis_server(redis_binary, tmp_path):
    """A fresh redis-server on a free loopback port, persistence off; killed after."""
    from vllm_kvflow.redis_server import RedisServer

    with RedisServer(tmp_path / "redis", binary=redis_binary) as server:
        yield server

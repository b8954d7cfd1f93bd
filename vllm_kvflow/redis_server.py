"""A throwaway Redis (or Valkey) server on a free loopback port, in a directory of its
own, with persistence off: for tests and benchmarks of the remote chunk tier.

Uses `redis-server` from PATH, else `valkey-server` (scripts/install.sh installs Debian's
redis-server when run as root). kill()/start() simulate a crash and a restart on the
same port; pause()/resume() a stalled server (SIGSTOP/SIGCONT).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from vllm_kvflow.server import free_port

BINARIES = ("redis-server", "valkey-server")
MISSING = ("no redis-server or valkey-server on PATH: run scripts/install.sh as root "
           "(it installs Debian's redis-server), or `apt-get install redis-server`")


def find_binary() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


class RedisServer:
    """Context manager: starts the server, waits for PING, kills it on exit."""

    def __init__(self, workdir: str | Path, args: Sequence[str] = (), binary: str | None = None,
                 startup_timeout_s: float = 20.0):
        self.binary = binary or find_binary()
        if self.binary is None:
            raise FileNotFoundError(MISSING)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = list(args)
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def start(self) -> None:
        """Start (again, after kill(): same port, empty)."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--daemonize", "no", *self.args]
        self._log = open(self.workdir / "server.log", "a")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.workdir / "server.log").read_text()[-2000:]
                raise RuntimeError(f"{self.binary} did not start on port {self.port}:\n{log}")
            time.sleep(0.05)

    def ping(self, timeout_s: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash (its data is gone: persistence is off)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process dies on SIGKILL too, but reaps cleaner awake
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

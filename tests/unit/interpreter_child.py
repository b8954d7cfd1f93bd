"""Run a test file's `test_interp_*` tests in a child pytest with TRITON_INTERPRET=1.

The interpreter must be chosen before triton is first imported (triton.language's own
@jit helpers such as tl.sum are built at import), and setting it in this process would
leak into every later test module. A child process keeps it contained.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IN_CHILD = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_REPO = Path(__file__).resolve().parents[2]


def run_interpreter_child(test_file: str) -> str:
    """Runs the child, asserts its tests passed with none skipped; returns its last line."""
    if IN_CHILD:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q",
           "-p", "no:cacheprovider", "-k", "test_interp_"]
    res = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter tests failed:\n{tail}"
    last = res.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, tail
    return last


def require_interpreter_child(parent_test: str) -> None:
    """For a file's `interp` fixture: its tests run only inside the TRITON_INTERPRET=1
    child started by `parent_test` (skipped in the parent process)."""
    if not IN_CHILD:
        pytest.skip(f"runs in the TRITON_INTERPRET=1 child of {parent_test}")
    pytest.importorskip("triton")

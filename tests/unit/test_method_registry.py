"""One registry per method: the settings' METHODS are its names, and the code that runs
the methods (scheduler side, worker side, pipeline, passes) asks a method what it needs
and never names one, so adding a method touches blend/selection.py only."""
from __future__ import annotations

import ast
from pathlib import Path

from vllm_kvflow.blend import selection
from vllm_kvflow.blend.signals import SIGNALS
from vllm_kvflow.config import METHODS

ROOT = Path(selection.__file__).resolve().parents[1]
RUNNERS = ["connector/scheduler.py", "connector/worker.py", "blend/pipeline.py", "blend/work_queue.py",
           "blend/signals.py", "blend/executor.py", "blend/pass_graphs.py"]


def test_settings_methods_are_the_registry():
    assert METHODS == tuple(selection.METHODS)
    for m in selection.METHODS.values():
        assert all(name in SIGNALS for name in m.signals), m


def test_the_code_that_runs_methods_names_none():
    names = set(selection.METHODS)
    for rel in RUNNERS:
        tree = ast.parse((ROOT / rel).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & names, (rel, literals & names)

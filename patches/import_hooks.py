"""Run a function on a module once it is imported, or at once if it already is.

The plugin loads in every vLLM process, and not always at the same point of each:
depending on the vLLM version and on how the server was started (`vllm serve`,
`python -m vllm.entrypoints.openai.api_server`), the API server imports its serving
modules before the plugin loads, after it, or lazily on first use. Patching them on
import makes that order irrelevant, and a process that never imports a module (the
engine core, the workers) never pays for it.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable

_lock = threading.Lock()
_pending: dict[str, dict[str, Callable[[ModuleType], None]]] = {}


class _ThenPatch(importlib.abc.Loader):
    """The module's own loader, then the callbacks registered for it."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self._name, {})
        for callback in callbacks.values():
            callback(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenPatch(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """callback(module) now if module_name is imported, else right after its import.

    A callback is registered once per (module, callback name): the plugin's entry point
    runs more than once per process."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    with _lock:
        _pending.setdefault(module_name, {})[f"{callback.__module__}.{callback.__qualname__}"] = callback
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)

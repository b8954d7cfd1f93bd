"""patches/import_hooks: a callback runs once its module is imported, or at once if it is
already; a module that is never imported is never touched."""
from __future__ import annotations

import sys

from vllm_kvflow.patches.import_hooks import when_imported


def _write_module(tmp_path, name: str) -> None:
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")


def test_callback_runs_after_a_later_import(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "kvflow_hook_later")
    seen = []

    def patch(module):
        seen.append(module.VALUE)  # runs after the module's own code
        module.VALUE = 2

    when_imported("kvflow_hook_later", patch)
    when_imported("kvflow_hook_later", patch)  # the plugin loads more than once: one call
    assert seen == []
    import kvflow_hook_later

    assert seen == [1] and kvflow_hook_later.VALUE == 2
    del sys.modules["kvflow_hook_later"]


def test_callback_runs_at_once_for_an_imported_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "kvflow_hook_now")
    import kvflow_hook_now

    seen = []
    when_imported("kvflow_hook_now", lambda m: seen.append(m.__name__))
    assert seen == ["kvflow_hook_now"]
    del sys.modules["kvflow_hook_now"]


def test_a_module_never_imported_is_never_touched(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("kvflow_hook_never", seen.append)
    _write_module(tmp_path, "kvflow_hook_other")
    import kvflow_hook_other  # noqa: F401 - another module: no callback

    assert seen == []
    del sys.modules["kvflow_hook_other"]

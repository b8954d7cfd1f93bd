"""csrc_triton/ and patches/ are the subpackages vllm_kvflow.kernels and .patches of the
checkout that vllm_kvflow itself is imported from, with no links and no install step."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_paths(pythonpath: Path) -> list[str]:
    code = ("import vllm_kvflow, vllm_kvflow.kernels.chunk_load as k, vllm_kvflow.patches.prefix_cache as p;"
            "print(vllm_kvflow.__file__); print(k.__file__); print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pythonpath), "PATH": ""},
                         capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.split()


def test_a_copy_of_the_checkout_on_pythonpath_imports_its_own_subpackages(tmp_path):
    copy = tmp_path / "checkout"
    for folder in ("vllm_kvflow", "csrc_triton", "patches"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    package, kernels, patches = (Path(p) for p in _import_paths(copy))
    assert package == copy / "vllm_kvflow" / "__init__.py"
    assert kernels == copy / "csrc_triton" / "chunk_load.py"
    assert patches == copy / "patches" / "prefix_cache.py"
    assert not (copy / "vllm_kvflow" / "kernels").exists()  # no link was made

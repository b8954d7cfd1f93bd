#!/usr/bin/env bash
# Run a command with this checkout importable as vllm_kvflow (plugin entry point
# included) beside the vLLM 0.26 site unpacked in $HOME/site (shared/gpu/README.md).
# The GPU image has no setuptools for `pip install -e .`: the checkout goes on PYTHONPATH
# (vllm_kvflow/__init__.py mounts csrc_triton/ and patches/ as its kernels and patches
# subpackages) and a minimal dist-info declares the plugin's entry point.
#   bash benchmarks/gpu/env.sh python3 benchmarks/gpu/engine_check.py --model ... --out ...
set -eo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
META="$HOME/kvflow_meta/vllm_kvflow-0.1.0.dist-info"
mkdir -p "$META"
printf 'Metadata-Version: 2.1\nName: vllm_kvflow\nVersion: 0.1.0\n' > "$META/METADATA"
printf '[vllm.general_plugins]\nkvflow = vllm_kvflow.plugin:register\n' > "$META/entry_points.txt"
# PYTHONPATH_EXTRA: more folders of carried packages (e.g. the redis client).
export PYTHONPATH="$ROOT:$HOME/kvflow_meta:$HOME/site${PYTHONPATH_EXTRA:+:$PYTHONPATH_EXTRA}" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
exec "$@"

#!/usr/bin/env bash
# One device call: install, GPU correctness tests of the reuse-path kernels, then the
# kernel benchmark. Usage (repository root, on the GPU machine): bash benchmarks/run_kernels_gpu.sh OUTDIR
set -o pipefail
OUTDIR=${1:-${OUT:-/tmp/kvflow_out}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The checkout on PYTHONPATH: vllm_kvflow mounts csrc_triton/ as vllm_kvflow.kernels.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import vllm_kvflow.kernels.chunk_load as m; print('kernels from', m.__file__)" || exit 1
python3 -m pytest tests/gpu/test_kernels_gpu.py -q -m gpu -n 8 -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning 2>&1 \
  | tee "$OUTDIR/gpu_tests.log" | tail -n 25
python3 -m vllm_kvflow.cli bench kernels --out "$OUTDIR/kernels.json" "${@:2}" 2>&1 | tee "$OUTDIR/bench.log"

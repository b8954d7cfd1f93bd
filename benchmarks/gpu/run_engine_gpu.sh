#!/usr/bin/env bash
# GPU engine runs (exactness check, TTFT), from the repository root on the GPU machine
# once the vLLM 0.26 site is unpacked in $HOME/site (see env.sh). Model dirs come from
# prepare_models.py.
#   bash benchmarks/gpu/run_engine_gpu.sh check MODELS_DIR OUTDIR [engine_check args]
#   bash benchmarks/gpu/run_engine_gpu.sh ttft  MODELS_DIR OUTDIR [bench ttft args]
set -o pipefail
what=$1 models=$2 out=$3; shift 3
mkdir -p "$out"
env_sh="$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case $what in
  check)
    for m in ${CHECK_MODELS:-smollm2-135m llama-3.1-8b}; do
      tag=$m${TAG:+_$TAG}
      bash "$env_sh" python3 benchmarks/gpu/engine_check.py --model "$models/$m" \
        --out "$out/check_$tag.json" "$@" > "$out/check_$tag.log" 2>&1
      echo "exit $?"; grep -A12 "^$models/$m on" "$out/check_$tag.log" || tail -n 30 "$out/check_$tag.log"
    done ;;
  ttft)
    bash "$env_sh" python3 -m vllm_kvflow.cli bench ttft --load-format dummy \
      --methods full,prefix-hit,none,cacheblend,infoflow --ratio 0.15 "$@" 2>&1 \
      | tee "$out/ttft${TAG:+_$TAG}.log" | grep -v "INFO\|WARNING\|Capturing" | tail -n 30 ;;
esac

#!/usr/bin/env bash
# GPU engine runs (exactness check, TTFT), from the repository root on the GPU machine
# once the vLLM 0.26 site is unpacked in $HOME/site (see env.sh). Model dirs come from
# prepare_models.py.
#   bash benchmarks/gpu/run_engine_gpu.sh check MODELS_DIR OUTDIR [engine_check args]
#   bash benchmarks/gpu/run_engine_gpu.sh ttft  MODELS_DIR OUTDIR [bench ttft args]
#   bash benchmarks/gpu/run_engine_gpu.sh load  MODELS_DIR OUTDIR MODEL_DIR [bench load args]
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
  load)  # a server started as the README says (`vllm serve` with the connector), then
         # `kvflow bench load` against it; first argument: the model dir
    model=$1; shift
    port=$((18000 + RANDOM % 2000))
    # KVFLOW_SETTINGS: more engine settings as JSON, e.g. '{"max_blend_tokens_per_step": 256}';
    # SERVE_ARGS: more `vllm serve` flags, e.g. '--api-server-count 2'
    cfg=$(KVFLOW_SETTINGS=${KVFLOW_SETTINGS:-'{}'} bash "$env_sh" python3 -c 'import json, os, vllm_kvflow; print(json.dumps(vllm_kvflow.transfer_config(**{"log_stats": False, "store_device_gb": 24.0, **json.loads(os.environ["KVFLOW_SETTINGS"])})))')
    log="$out/server${TAG:+_$TAG}.log"
    t0=$(date +%s.%N)
    bash "$env_sh" python3 -m vllm.entrypoints.cli.main serve "$model" --load-format dummy \
      --port $port --max-model-len 8192 --gpu-memory-utilization 0.6 \
      --kv-transfer-config "$cfg" ${SERVE_ARGS:-} > "$log" 2>&1 &
    srv=$!
    until bash "$env_sh" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
      kill -0 $srv 2>/dev/null || { echo "server died"; tail -n 40 "$log"; exit 1; }; sleep 2
    done
    echo "server up in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
    grep -h "kvflow: pipeline ready" "$log" | tail -n 1
    # LOAD_TIMEOUT_S: past it, every server process prints its threads' Python stacks
    # into the log (the plugin's SIGUSR1 handler) and the stacks are shown: a stall is
    # seen where it stands instead of being killed blind at the device call's limit.
    timeout "${LOAD_TIMEOUT_S:-0}" bash "$env_sh" python3 -m vllm_kvflow.cli bench load \
      --server "http://127.0.0.1:$port" "$@" 2>&1 | grep -v "INFO\|WARNING"
    if [ "${PIPESTATUS[0]}" = 124 ]; then
      echo "bench load timed out after $LOAD_TIMEOUT_S s: the server's Python stacks"
      descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
      for p in $srv $(descendants $srv); do kill -USR1 "$p" 2>/dev/null; done
      sleep 3
      grep -A25 "Current thread 0x\|Thread 0x" "$log" | grep -v "site-packages/torch\|threading.py" | tail -n 150
    fi
    grep -A80 "no engine step finished" "$log" | grep -v "site-packages/torch\|threading.py" | head -n 120
    grep -c "Triton\|JIT\|compil" "$log" | sed 's/^/log lines mentioning Triton\/JIT\/compile after start: /'
    sed -n '/kvflow: pipeline ready/,$p' "$log" | grep -c "pass graph captured for" \
      | sed 's/^/pass graphs captured while serving: /'
    grep -ho "kvflow steps (last.*" "$log" | tail -n 40  # with log_steps_every_s set
    kill $srv; wait $srv 2>/dev/null ;;
  ttft)
    bash "$env_sh" python3 -m vllm_kvflow.cli bench ttft --load-format dummy \
      --methods full,prefix-hit,none,cacheblend,infoflow --ratio 0.15 "$@" 2>&1 \
      | tee "$out/ttft${TAG:+_$TAG}.log" | grep -v "INFO\|WARNING\|Capturing" | tail -n 30 ;;
esac

#!/usr/bin/env bash
# The GPU engine runs, in the order they were made on a two-GPU machine (each step fits
# one 10-minute device call; independent runs go side by side, one per GPU).
#   bash benchmarks/gpu/suite.sh tests|engine|more|tp2|profile|batch|tp2check|load|loadapi|load64|arena|arenastreams|arenaload|arenabudget|sidec8|probeprofile|syncprobe|concurrent|fleet|vision|quality MODELS OUT
# MODELS: model dirs from prepare_models.py; OUT: where logs and JSON go. vLLM staged as
# ../shared/gpu/README.md says, in the parts of resplit_stage.sh (which fit beside this tree).
set -o pipefail
step=$1 models=$2 out=$3
here=$(dirname "$0")
ttft="bash $here/run_engine_gpu.sh ttft $models"
sizes=4096,8192,16384,32768
# The burst probe: a 200-token request alone, then during 32 requests of 8 fresh documents.
burst_probe="--probe --probe-tokens 200 --burst 32 --burst-docs 8 --burst-doc-words 330"
case $step in
  tests)  # graphs and kernels against their references, no vLLM needed
    bash "$here/env.sh" python3 -m pytest tests/gpu -q -x 2>&1 | tail -n 15 ;;
  engine)  # exactness (both shapes, fp16) beside the Llama TTFT, store in GPU memory
    OUT=$out bash "$here/parallel.sh" \
      "bash $here/run_engine_gpu.sh check $models $out/check --dtype float16" \
      "$ttft $out/llama_device --model $models/llama-3.1-8b --context-tokens $sizes --repeats 3 --store device --out $out/ttft_gpu_llama8b_device.json" ;;
  more)  # Qwen3 shape with the store in GPU memory, Llama with the store in host memory
    OUT=$out bash "$here/parallel.sh" \
      "$ttft $out/qwen_device --model $models/qwen3-8b --context-tokens $sizes --repeats 3 --store device --out $out/ttft_gpu_qwen3_8b_device.json" \
      "$ttft $out/llama_host --model $models/llama-3.1-8b --context-tokens $sizes --repeats 3 --store host --out $out/ttft_gpu_llama8b_host.json" ;;
  tp2)  # tensor parallel 2 over both GPUs: exactness, then TTFT
    CHECK_MODELS=llama-3.1-8b TAG=tp2 bash "$here/run_engine_gpu.sh" check "$models" "$out/check" --dtype float16 --tp 2
    VLLM_WORKER_MULTIPROC_METHOD=spawn TAG=tp2 $ttft "$out/tp2" --model "$models/llama-3.1-8b" \
      --context-tokens 8192,32768 --repeats 3 --store device --tensor-parallel-size 2 \
      --out "$out/ttft_gpu_llama8b_tp2_device.json" ;;
  profile)  # where one request's host time goes (cProfile), 8K and 32K side by side
    prof="bash $here/env.sh python3 $here/profile_request.py --model $models/llama-3.1-8b --load-format dummy"
    OUT=$out bash "$here/parallel.sh" \
      "$prof --context-tokens 8192 --methods none,prefix-hit,infoflow --out $out/profile" \
      "$prof --context-tokens 32768 --methods none,prefix-hit --out $out/profile" ;;
  batch)  # where a concurrent batch's time goes: GPU kernels, GPU busy share, host functions
    bash "$here/env.sh" python3 "$here/profile_batch.py" --model "$models/llama-3.1-8b" \
      --load-format dummy --requests 32 --out "$out/batch" 2>&1 | grep -v " INFO \| WARNING " | tail -n 6 ;;
  load)  # under load, one H200: full / none / infoflow at C = 8, 32 (one server start)
    load="bash $here/run_engine_gpu.sh load $models $out $models/llama-3.1-8b"
    $load --requests 300 --warmup 16 --docs 64 --docs-per-request 8 --doc-words 330 --zipf 1.1 \
      --max-tokens 16 --concurrency 8,32 --methods full,none,infoflow --max-seconds 120 \
      --out "$out/load_gpu_llama8b_H200.json" ;;
  loadapi)  # the C = 32 phase with 2, 4 and 8 API server processes (one server start each)
    for n in 2 4 8; do
      SERVE_ARGS="--api-server-count $n" TAG=c32api$n bash "$here/run_engine_gpu.sh" load "$models" "$out" \
        "$models/llama-3.1-8b" --requests 300 --warmup 16 --docs 64 --docs-per-request 8 --doc-words 330 \
        --zipf 1.1 --max-tokens 16 --concurrency 32 --methods full,none,infoflow --max-seconds 120 \
        --out "$out/load_gpu_llama8b_c32_api${n}_H200.json"
    done ;;
  load64)  # C = 64, then a small request during a burst of 32 all-miss 4K-token requests
    load="bash $here/run_engine_gpu.sh load $models $out $models/llama-3.1-8b"
    TAG=64 $load --requests 300 --warmup 16 --docs 64 --docs-per-request 8 --doc-words 330 --zipf 1.1 \
      --max-tokens 16 --concurrency 64 --methods full,none,infoflow --max-seconds 120 \
      --out "$out/load_gpu_llama8b_c64_H200.json"
    TAG=probe $load $burst_probe \
      --probe-repeats 5 --out "$out/probe_gpu_llama8b_H200.json" ;;
  arena)  # isolated computes on the static arena (KVFLOW_ISOLATED_ARENA=1, its passes from CUDA
          # graphs) against the eager isolated pass: the GPU tests, then the burst probe with
          # and without it, on one machine start (main stream, step lines in the log)
    bash "$here/env.sh" python3 -m pytest tests/gpu/test_dense_batch_gpu.py tests/gpu/test_pass_graphs_gpu.py \
      tests/gpu/test_no_jit_while_serving.py -q 2>&1 | tail -n 5
    for arena in 1 0; do
      KVFLOW_ISOLATED_ARENA=$arena KVFLOW_SETTINGS='{"log_steps_every_s": 0.5}' \
        SERVE_ARGS="--api-server-count 4" TAG=arena$arena bash "$here/run_engine_gpu.sh" load "$models" "$out" \
        "$models/llama-3.1-8b" $burst_probe \
        --probe-repeats 5 --out "$out/probe_gpu_llama8b_arena${arena}_H200.json"
    done ;;
  arenastreams)  # the arena's passes on a stream of their own (side, then background):
                 # the same probe, one server start each
    for stream in side background; do
      KVFLOW_ISOLATED_ARENA=1 KVFLOW_SETTINGS="{\"log_steps_every_s\": 0.5, \"blend_stream\": \"$stream\"}" \
        SERVE_ARGS="--api-server-count 4" TAG=arena_$stream bash "$here/run_engine_gpu.sh" load "$models" "$out" \
        "$models/llama-3.1-8b" $burst_probe \
        --probe-repeats 5 --out "$out/probe_gpu_llama8b_arena_${stream}_H200.json"
    done ;;
  arenaload)  # C = 32 with the arena, four API servers (STREAM: blend_stream, default main)
    KVFLOW_ISOLATED_ARENA=1 KVFLOW_SETTINGS="{\"blend_stream\": \"${STREAM:-main}\"}" \
      SERVE_ARGS="--api-server-count 4" TAG=arenaload bash "$here/run_engine_gpu.sh" load "$models" "$out" \
      "$models/llama-3.1-8b" --requests 300 --warmup 16 --docs 64 --docs-per-request 8 --doc-words 330 \
      --zipf 1.1 --max-tokens 16 --concurrency 32 --methods full,none,infoflow --max-seconds 90 \
      --out "$out/load_gpu_llama8b_c32_arena_${STREAM:-main}_H200.json" ;;
  arenabudget)  # other step budgets with the arena (BUDGETS, default "512 256": rows per step
                # for isolated computes and for blend passes alike; STREAM, default main): the
                # burst probe for each, C = 32 for the first (one server start each, step lines
                # on). `side` with "1024 2048": does a larger share per step close its C = 32
                # gap, now that the forwards no longer wait for it? YIELD: max_yield_steps
                # (default 1; another value is named in the outputs' tags). C32=0: probes only.
    first=${C32:-1} stream=${STREAM:-main} yield=${YIELD:-1}
    tag() { echo "$([ "$stream" = main ] || echo "${stream}_")budget$1$([ "$yield" = 1 ] || echo "_yield$yield")"; }
    for b in ${BUDGETS:-512 256}; do
      settings="{\"log_steps_every_s\": 0.5, \"blend_stream\": \"$stream\", \"max_isolated_tokens_per_step\": $b, \"max_blend_tokens_per_step\": $b, \"max_yield_steps\": $yield}"
      KVFLOW_SETTINGS=$settings SERVE_ARGS="--api-server-count 4" TAG=$(tag $b)probe LOAD_TIMEOUT_S=150 \
        bash "$here/run_engine_gpu.sh" load "$models" "$out" "$models/llama-3.1-8b" $burst_probe \
        --probe-repeats ${PROBE_REPEATS:-5} \
        --out "$out/probe_gpu_llama8b_arena_$(tag $b)_H200.json"
      [ $first = 1 ] && KVFLOW_SETTINGS=$settings SERVE_ARGS="--api-server-count 4" TAG=$(tag $b)load \
        LOAD_TIMEOUT_S=240 bash "$here/run_engine_gpu.sh" load "$models" "$out" "$models/llama-3.1-8b" \
        --requests 300 --warmup 16 --docs 64 --docs-per-request 8 --doc-words 330 --zipf 1.1 --max-tokens 16 \
        --concurrency 32 --methods full,none,infoflow --max-seconds 90 \
        --out "$out/load_gpu_llama8b_c32_arena_$(tag $b)_H200.json"
      first=0
    done ;;
  probeprofile)  # where the connector's host time goes in the burst probe's slow steps:
                 # each step's blend work under cProfile (KVFLOW_PROFILE_MODE=python), the
                 # functions summed over the steps of 20 ms and more (rank_step_profiles.py)
    rm -rf /tmp/kvflow_steps; KVFLOW_PROFILE_DIR=/tmp/kvflow_steps KVFLOW_PROFILE_MODE=python \
      KVFLOW_SETTINGS='{"log_steps_every_s": 0.5}' SERVE_ARGS="--api-server-count 4" \
      TAG=probeprofile LOAD_TIMEOUT_S=150 bash "$here/run_engine_gpu.sh" load "$models" "$out" "$models/llama-3.1-8b" \
      $burst_probe --probe-repeats 5 \
      --out "$out/probe_gpu_llama8b_profiled_H200.json" | grep -v "^kvflow steps"
    bash "$here/env.sh" python3 "$here/rank_step_profiles.py" /tmp/kvflow_steps --top 40 \
      | tee "$out/probe_step_profiles_H200.txt"
    tar -czf "$out/probe_step_profiles.tar.gz" -C /tmp kvflow_steps ;;
  syncprobe)  # the burst probe (ten probes, default settings) with every host wait for
              # the GPU inside the blend work reported (KVFLOW_SYNC_CHECK=1,
              # connector/worker._sync_checked): their call sites from the log
    KVFLOW_SYNC_CHECK=1 KVFLOW_SETTINGS='{"log_steps_every_s": 0.5}' SERVE_ARGS="--api-server-count 4" \
      TAG=syncprobe LOAD_TIMEOUT_S=150 bash "$here/run_engine_gpu.sh" load "$models" "$out" "$models/llama-3.1-8b" \
      $burst_probe --probe-repeats 10 \
      --out "$out/probe_gpu_llama8b_synccheck_H200.json" | grep -v "^kvflow steps"
    echo "host waits for the GPU in the blend work: $(grep -c "synchronizing CUDA operation" "$out/server_syncprobe.log") call sites"
    grep -B2 "synchronizing CUDA operation" "$out/server_syncprobe.log" | grep -v "^--$" | head -n 30 ;;
  sidec8)  # the C = 8 run that stalled on `side` with the arena, step lines and per-request
           # stats in the log; the engine reports a stall of 30 s itself (stall_report_s), and
           # past LOAD_TIMEOUT_S every server process is asked for its Python stacks
    KVFLOW_SETTINGS='{"blend_stream": "side", "log_steps_every_s": 1.0, "log_stats": true, "stall_report_s": 30}' \
      SERVE_ARGS="--api-server-count 4" TAG=c8side LOAD_TIMEOUT_S=${LOAD_TIMEOUT_S:-180} \
      bash "$here/run_engine_gpu.sh" load "$models" "$out" "$models/llama-3.1-8b" --requests 300 --warmup 16 \
      --docs 64 --docs-per-request 8 --doc-words 330 --zipf 1.1 --max-tokens 16 --concurrency 8 \
      --methods full,none,infoflow --max-seconds 50 --out "$out/load_gpu_llama8b_c8_arena_side_H200.json" ;;
  fleet)  # two replicas (one per GPU), each store alone, then both on one Redis (the shared tier)
    bash "$here/fleet.sh" "$models" "$out" "${REDIS_DIR:-.redis}" --requests 300 --warmup 0 --docs 64 \
      --docs-per-request 8 --doc-words 330 --zipf 1.1 --max-tokens 16 --concurrency 32 --max-seconds 120 ;;
  vision)  # HilbertA in vLLM's Qwen2.5-VL vision encoder (7B shapes, random weights): its GPU
           # tests, then encoder and attention times at 1024^2 and 2048^2 (MODELS unused)
    bash "$here/env.sh" python3 -m pytest tests/gpu/test_vision_encoder_gpu.py -q 2>&1 | tail -n 15
    bash "$here/env.sh" python3 benchmarks/gpu/vision_encoder_bench.py \
      --out "$out/vision_encoder_H200.json" 2>&1 | grep -v " INFO \| WARNING " | tail -n 20 ;;
  concurrent)  # the concurrency check alone in fp16 and in fp32 (DTYPES; each half takes over
               # 4 min: give each a call of its own) on the Llama-8B shape: if fp32
               # selections agree where fp16's differ, the fp16 failure is rounding at
               # near-ties of random weights, not a defect of the batched passes
    for dt in ${DTYPES:-float16 float32}; do
      bash "$here/env.sh" python3 "$here/engine_check.py" --model "$models/llama-3.1-8b" --dtype $dt \
        --only-concurrent --out "$out/check_concurrent_$dt.json" 2>&1 | grep -A3 "^$models" | tail -n 3
    done ;;
  tp2check)  # the tensor-parallel exactness check alone
    CHECK_MODELS=llama-3.1-8b TAG=tp2 bash "$here/run_engine_gpu.sh" check "$models" "$out/check" --dtype float16 --tp 2 ;;
  quality)  # real SmolLM2-135M-Instruct weights (bf16), both question sets side by side on
            # one GPU. Needs the GGUF staged as ../shared/gpu/pack-smollm2.sh says, with
            # PYTHONPATH_EXTRA=/tmp/gg:$HOME/smol (MODELS unused). QUALITY_LIMIT for a trial.
    model=$(bash "$here/env.sh" python3 -m vllm_kvflow.cli make-model 2>/dev/null | tail -n 1)
    [ -d "$model" ] || { echo "make-model failed"; bash "$here/env.sh" python3 -m vllm_kvflow.cli make-model; exit 1; }
    q="bash $here/env.sh python3 -m vllm_kvflow.cli bench quality --model $model --gpu-memory-utilization 0.3
       --methods ${QUALITY_METHODS:-full,none,random,epic,cacheblend,infoflow,infoflow-dev,infoflow-pos,infoflow-quota}
       --ratio ${QUALITY_RATIOS:-0.05,0.1,0.15,0.3,0.5} --limit ${QUALITY_LIMIT:-300}"
    for set in fictional specs; do
      $q --dataset "benchmarks/${set}_qa_300.jsonl" --out "$out/quality_gpu_smollm2_${set}_n${QUALITY_LIMIT:-300}.json" \
        > "$out/quality_$set.log" 2>&1 &
    done
    wait
    for set in fictional specs; do
      grep -v " INFO \| WARNING \|it/s\]\|s/it\]" "$out/quality_$set.log" | tail -n 48
    done ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The shared chunk tier on a fleet: two replicas of one model, one per GPU, behind a
# client that alternates requests between them, once with each replica's own store only
# and once with both on one Redis on the host (store_remote_url). Cold start each time
# (fresh servers, fresh Redis): the chunk misses show what the shared tier saves.
#   bash benchmarks/gpu/fleet.sh MODELS OUT REDIS_DIR [bench load args]
# REDIS_DIR: Debian's redis-server, redis-tools, libjemalloc2, liblzf1 .deb files and the
# redis Python wheel, carried to the machine (nothing can be fetched there).
set -o pipefail
models=$1 out=$2 redis_dir=$3; shift 3
here=$(dirname "$0")
env_sh="$here/env.sh"
mkdir -p "$out" "$HOME/redisroot"
for deb in "$redis_dir"/*.deb; do dpkg -x "$deb" "$HOME/redisroot"; done
python3 -m pip install -q --no-index --no-deps --target /tmp/redis_py "$redis_dir"/redis-*.whl || exit 1
export PYTHONPATH_EXTRA=/tmp/redis_py
redis_bin="$HOME/redisroot/usr/bin/redis-server"
export LD_LIBRARY_PATH="$HOME/redisroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
model="$models/llama-3.1-8b"

serve() {  # serve GPU PORT CONFIG_JSON LOG
  CUDA_VISIBLE_DEVICES=$1 PYTHONPATH_EXTRA=/tmp/redis_py bash "$env_sh" python3 -m vllm.entrypoints.cli.main \
    serve "$model" --load-format dummy --port "$2" --max-model-len 8192 \
    --gpu-memory-utilization 0.6 --kv-transfer-config "$3" > "$4" 2>&1 &
}
wait_up() {  # wait_up PORT PID LOG
  until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=2)" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "server on $1 died"; tail -n 30 "$3"; return 1; }; sleep 2
  done
}

for mode in local shared; do
  extra=""
  if [ $mode = shared ]; then
    "$redis_bin" --port 6399 --save '' --appendonly no --maxmemory 60gb \
      --maxmemory-policy allkeys-lru --daemonize no > "$out/redis.log" 2>&1 &
    redis_pid=$!
    extra=', "store_remote_url": "redis://127.0.0.1:6399/0"'
  fi
  cfg=$(bash "$env_sh" python3 -c "import json, vllm_kvflow; c = vllm_kvflow.transfer_config(log_stats=False, store_device_gb=24.0); c['kv_connector_extra_config'].update({${extra#, }}); print(json.dumps(c))")
  serve 0 18100 "$cfg" "$out/fleet_${mode}_0.log"; p0=$!
  serve 1 18101 "$cfg" "$out/fleet_${mode}_1.log"; p1=$!
  wait_up 18100 $p0 "$out/fleet_${mode}_0.log" && wait_up 18101 $p1 "$out/fleet_${mode}_1.log" || exit 1
  echo "== $mode: two replicas up"
  bash "$env_sh" python3 -m vllm_kvflow.cli bench load --server http://127.0.0.1:18100,http://127.0.0.1:18101 \
    --methods infoflow "$@" --out "$out/fleet_${mode}_H200.json" 2>&1 | grep -v "INFO\|WARNING"
  kill $p0 $p1; wait $p0 $p1 2>/dev/null
  [ $mode = shared ] && { kill $redis_pid; wait $redis_pid 2>/dev/null; }
done

#!/usr/bin/env bash
# Run two commands at once, one per GPU of a two-GPU machine (device time is wall time:
# independent runs side by side halve it). Usage: bash parallel.sh "CMD for GPU 0" "CMD for GPU 1"
# Each command's output goes to $OUT/gpu0.log / gpu1.log and is summarized at the end.
out=${OUT:-/tmp/kvflow_out}
mkdir -p "$out"
CUDA_VISIBLE_DEVICES=0 bash -c "$1" > "$out/gpu0.log" 2>&1 & p0=$!
CUDA_VISIBLE_DEVICES=1 bash -c "$2" > "$out/gpu1.log" 2>&1 & p1=$!
wait $p0; r0=$?
wait $p1; r1=$?
for i in 0 1; do echo "=== GPU $i (exit $([ $i = 0 ] && echo $r0 || echo $r1))"; grep -v "INFO\|WARNING\|Capturing\|it/s\]" "$out/gpu$i.log" | tail -n 40; done

#!/usr/bin/env bash
# Re-split the vLLM site built by ../shared/gpu/build-vllm-site.sh STAGE into parts small
# enough to travel beside this checkout. A device call carries the working tree (files
# git does not ignore: result JSON, question sets) and its `carry` paths, 64 MiB in all;
# the tree has outgrown the 4 MiB that the script's 60 MiB parts leave. Writes STAGE/q1,
# q2, ..., each 64 MiB minus the tree, less 1 MiB of margin (the last, shorter, leaves
# room for the model configs). Stage them one call each as ../shared/gpu/README.md says
# for part1.., with STAGE/site.tar.xz.sha256 carried in the last call.
#   bash benchmarks/gpu/resplit_stage.sh .stage
set -eo pipefail
stage=${1:?usage: resplit_stage.sh STAGE}
tree_mib=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print int(s / 1048576) + 1}')
part_mib=$((64 - tree_mib - 1))
rm -rf "$stage"/q*
mkdir -p "$stage/q"
cat "$stage"/part*/site.tar.xz.0* | split -b "${part_mib}M" -d -a 2 - "$stage/q/site.tar.xz."
n=0
for f in "$stage"/q/site.tar.xz.*; do
  n=$((n + 1)); mkdir -p "$stage/q$n"; mv "$f" "$stage/q$n/"
done
rmdir "$stage/q"
echo "tree ${tree_mib} MiB: $n parts of at most ${part_mib} MiB in $stage/q1..q$n"
(cd "$stage" && cat q*/site.tar.xz.0* | sha256sum | awk '{print $1 "  site.tar.xz"}' | diff - site.tar.xz.sha256 \
  && echo "checksum matches site.tar.xz.sha256")

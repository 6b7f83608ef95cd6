#!/usr/bin/env bash
# The GPU check's MLP parts under a few XLA flag sets, one fresh process each (XLA reads its flags
# when jax starts), then ResNet-18 once with the defaults. About 4 minutes on one H200.
#
#   benchmarks/gpu_xla_flags.sh [OUT_DIR]      # default benchmarks/results; files gpu_xla_*.json/md
#
# Variants: XLA's defaults; loops and conditionals captured into CUDA graphs as well
# (--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL); no CUDA graphs at all.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
dry=()
if [[ "${2:-}" == "--dry-run" ]]; then dry=(--dry-run); fi
parts=program,train_vmap,train_single,forget,verify
variant() {
  local tag=$1
  shift
  echo "== variant $tag: XLA_FLAGS='$*'"
  XLA_FLAGS="$*" bash benchmarks/gpu.sh ${dry[@]+"${dry[@]}"} --out "$out" --parts "$parts" \
    --grid "${GRID:-128x8,32x1}" --tag "$tag" --forgets 10 --budget-s 150 ||
    echo "== variant $tag failed (rc $?)"
}
variant _xla_default ""
variant _xla_graph_while "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
variant _xla_graph_off "--xla_gpu_enable_command_buffer="
echo "== ResNet-18 with XLA's defaults"
bash benchmarks/gpu.sh ${dry[@]+"${dry[@]}"} --out "$out" --parts resnet18 --tag _resnet --budget-s 200 ||
  echo "== resnet failed (rc $?)"

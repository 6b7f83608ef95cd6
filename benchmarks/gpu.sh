#!/usr/bin/env bash
# Benchmark items 1-2 (training throughput, unlearning latency) at full size on one GPU, in one
# command, with shard_exec=vmap. Prints the same tables as bench_train / bench_forget and writes
# benchmarks/results/bench_{train,forget}_gpu.{json,md}. Expected well under 8 minutes on one
# H100 (the S=20, R=50 checkpoint writes, ~380 MB per training run, are CPU/disk work).
#
#   benchmarks/gpu.sh            # needs a CUDA build of JAX in $PYTHON (default .venv/bin/python),
#                                # e.g. pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
#   benchmarks/gpu.sh --quick    # tiny sizes; also runs on a CPU (checks that the script works)
#
# Extra arguments go to both benchmarks (e.g. --cache none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

quick=()
extra=()
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick) ;;
    *) extra+=("$a") ;;
  esac
done

backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [[ ${#quick[@]} -eq 0 && "$backend" != "gpu" ]]; then
  echo "gpu.sh: JAX's backend is '$backend', not 'gpu'. Install a CUDA build of JAX into" >&2
  echo "\$PYTHON ($PY), or run 'benchmarks/gpu.sh --quick' to check the script on a CPU." >&2
  exit 2
fi
tag=gpu
[[ "$backend" == "gpu" ]] || tag="gpu-script-on-$backend"
out=benchmarks/results
[[ ${#quick[@]} -eq 0 ]] || out=benchmarks/results/quick
"$PY" -c 'import jax; print("devices:", jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

start=$SECONDS
# Item 1: one model vs SISA (vmap, all shards in one program) vs a per-shard loop (width 1).
# The single model runs as a plain width-1 program (map), its fastest form.
"$PY" -m benchmarks.bench_train ${quick[@]+"${quick[@]}"} --execs vmap --extra-execs vmap \
  --single-exec map --tag "$tag" --cache runs/bench-cache-gpu ${extra[@]+"${extra[@]}"}
# Item 2: forget latency vs full retrain vs the analytic speedups (run trained with vmap).
"$PY" -m benchmarks.bench_forget ${quick[@]+"${quick[@]}"} --exec vmap --tag "$tag" \
  --cache runs/bench-cache-gpu ${extra[@]+"${extra[@]}"}
echo "gpu.sh: done in $((SECONDS - start)) s; results in $out/bench_{train,forget}_$tag.md"

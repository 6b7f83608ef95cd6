#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py) in one command, in at most ~5 minutes on one GPU: vmap vs
# lax.map vs a per-shard loop vs one model, one-id and batched forgets vs the full retrain,
# exactness of every checkpoint under XLA's determinism flags. Writes benchmarks/results/gpu.md.
#
#   benchmarks/gpu.sh             # on the GPU machine: its python3 with a CUDA jax, from source
#   benchmarks/gpu.sh --dry-run   # the same code at tiny sizes on any backend (CI runs this)
#
# Runs the project from the source tree (PYTHONPATH), against the machine's own jax/flax/optax;
# hydra-core is not needed (the library never imports it). Wheels for packages the machine
# lacks can be put in .whl/ (installed into /tmp/sisajax-site first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/sisajax-site .whl/*.whl
  export PYTHONPATH=/tmp/sisajax-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# bit-identity on a GPU needs deterministic reductions and scatters
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true --xla_gpu_exclude_nondeterministic_ops=true"
export SISAJAX_CPU_DEVICES=${SISAJAX_CPU_DEVICES:-1}
dry=()
if [[ "${1:-}" == "--dry-run" ]]; then dry=(--dry-run); shift; fi
backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [[ ${#dry[@]} -eq 0 && "$backend" != "gpu" ]]; then
  echo "gpu.sh: JAX's backend is '$backend', not 'gpu'; run 'benchmarks/gpu.sh --dry-run' to check the script here." >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
start=$SECONDS
"$PY" -m benchmarks.gpu ${dry[@]+"${dry[@]}"} "$@"
echo "gpu.sh: done in $((SECONDS - start)) s"

#!/usr/bin/env bash
# The checks that need a GPU (docs/gpu.md): build with `--features cuda`, require the GPU
# tests of crates/deltatune-cli/tests/gpu.rs to run and pass (training on `cuda:0` logs and
# saves what the same run on the CPU does), then time `deltatune bench` on both devices.
#
# Needs nvcc on PATH (or CUDA_HOME) and the NVIDIA driver. CUDA_COMPUTE_CAP defaults to what
# nvidia-smi reports. Usage: bash scripts/gpu_check.sh [bench steps, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-5}"

if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
command -v nvcc >/dev/null || { echo "gpu_check: nvcc not found (set CUDA_HOME or PATH; docs/gpu.md)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"
  export CUDA_COMPUTE_CAP
fi

cargo build --release -p deltatune-cli --features cuda
DELTATUNE_REQUIRE_GPU=1 cargo test --release -p deltatune-cli --features cuda --test gpu -- --nocapture

bin=./target/release/deltatune
for device in cpu cuda:0; do
  echo "== deltatune --device $device bench --steps $steps"
  "$bin" --device "$device" bench --steps "$steps" --no-progress
  echo "== deltatune --device $device bench --task generate --steps $steps"
  "$bin" --device "$device" bench --task generate --steps "$steps" --no-progress
done

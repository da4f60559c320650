#!/usr/bin/env bash
# Every speed row of the README in one run, each side by side with its reference on this machine:
# PyTorch + PEFT on the encoder (scripts/bench_peft.py) and the decoder
# (scripts/bench_peft_decoder.py), llama.cpp's generation (scripts/bench_llamacpp.py), then
# `deltatune bench` for both with those JSON files as references. Medians (min-max) over
# STEPS timed repetitions (default 10) after 3 warm-up ones.
#
# Set-up (not part of CI): bash scripts/setup_ref_venv.sh && cargo build --release
# Run:    bash scripts/bench_all.sh [OUT_DIR]      (tables on stdout, JSON in OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
steps=${STEPS:-10}
mkdir -p "$out"
py=.venv-ref/bin/python
dt=target/release/deltatune
cache=${DELTATUNE_CACHE:-$HOME/.cache/deltatune}
gguf=$cache/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf
$py scripts/bench_peft.py --model "$cache/models/all-MiniLM-L6-v2" --steps "$steps" --out "$out/peft.json" >/dev/null
$py scripts/bench_peft_decoder.py --gguf "$gguf" --steps "$steps" --out "$out/peft-decoder.json" >/dev/null 2>&1
$py scripts/bench_llamacpp.py --gguf "$gguf" --runs "$steps" --out "$out/llamacpp.json" >/dev/null 2>&1
$dt bench --steps "$steps" --reference "$out/peft.json" | tee "$out/encoder.md"
$dt bench --task generate --steps "$steps" --reference "$out/peft-decoder.json" \
  --reference "$out/llamacpp.json" 2>/dev/null | tee "$out/decoder.md"

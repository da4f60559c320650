#!/usr/bin/env bash
# Builds deltatune-fuzz and runs every fuzz target for CASES cases each (default 100000).
#   scripts/fuzz.sh [CASES] [SEED]        e.g. scripts/fuzz.sh 2000 (the CI run)
# Crashing inputs are kept under target/fuzz-crashes/ with the command that replays them; the
# run exits non-zero on any panic, hang (> 5 s per case), heap peak over the limit or abort.
# Environment: CARGO_TARGET_DIR to build elsewhere; FUZZ_JOBS for cargo's -j; FUZZ_PROFILE=fuzz
# for the release build with integer-overflow checks in deltatune's crates (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-100000}"
seed="${2:-1}"
target_dir="${CARGO_TARGET_DIR:-target}"
profile="${FUZZ_PROFILE:-release}"
jobs=()
if [[ -n "${FUZZ_JOBS:-}" ]]; then jobs=(-j "$FUZZ_JOBS"); fi
cargo build --profile "$profile" --locked "${jobs[@]}" -p deltatune-fuzz
exec "$target_dir/$profile/deltatune-fuzz" all --cases "$cases" --seed "$seed"

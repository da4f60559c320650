#!/usr/bin/env bash
# ASHA on the real task (MiniLM-L6, Rotten Tomatoes): the same random configurations (sampler
# seed 11) searched once with the ASHA pruner and once run to completion, then
# `deltatune study compare` prints what the pruned trials cost in each. Kept small enough for a
# 2-core machine (about 10 minutes): trials train 2 epochs on a ninth of the training set and
# report dev accuracy on the first 300 dev sentences every 10 optimiser steps.
#
#   bash scripts/asha_savings.sh            # after `deltatune fetch` and a release build
#   TRIALS=12 bash scripts/asha_savings.sh  # more trials
#   PRUNER=asha:3 bash scripts/asha_savings.sh  # another pruner spec
set -euo pipefail
cd "$(dirname "$0")/.."
DT=${DT:-./target/release/deltatune}
OUT=${OUT:-runs/asha-savings}
TRIALS=${TRIALS:-6}
PRUNER=${PRUNER:-asha}   # e.g. PRUNER=asha:3 for a first rung at the third evaluation
DATA=${DELTATUNE_CACHE:-$HOME/.cache/deltatune}/data/rotten_tomatoes
mkdir -p "$OUT"
rm -f "$OUT/studies.db"
head -n 301 "$DATA/dev.csv" > "$OUT/dev-300.csv"
cat > "$OUT/space.toml" <<'SPACE'
direction = "maximize"
[train]
lr = { float = [1e-4, 3e-2], log = true }
[methods.lora]
r = { int = [4, 16], step = 4 }
[methods.ia3]
[methods.bitfit]
[methods.prompt]
SPACE
for pruner in "$PRUNER" none; do
  "$DT" search --space "$OUT/space.toml" --study "$pruner" --storage "$OUT/studies.db" \
    --runs "$OUT/trials" --trials "$TRIALS" --sampler random --seed 11 --pruner "$pruner" \
    --report-every-steps 10 \
    --set "data.train=$DATA/train.csv" --set data.train_shard=0/9 \
    --set "data.dev=$OUT/dev-300.csv" --set train.epochs=2
done
"$DT" study compare "$PRUNER" --against none --storage "$OUT/studies.db" | tee "$OUT/compare.txt"

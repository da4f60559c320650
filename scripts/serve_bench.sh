#!/usr/bin/env bash
# Measures `deltatune serve` under load (issue: serve many adapters), for the default decoder
# (completions, 16 new tokens) and the default encoder (classification):
#   1. one server holding 8 LoRA adapters, 64 clients spread over the 8;
#   2. the same server, 64 clients on 1 adapter;
#   3. one process per adapter (8 servers), 64 clients spread over them;
# and the memory of a server with 8 and with 64 adapters loaded. Writes docs/serve.json and
# prints the table of docs/serve.md.
#
#   bash scripts/serve_bench.sh            # 60 s per load (DURATION=20 for a quick look)
#
# Needs the release build, the default models (deltatune fetch) and the reference venv
# (scripts/setup_ref_venv.sh) to write the adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-64}
BIN=$(mktemp -d)/deltatune
cp target/release/deltatune "$BIN"
W=$(mktemp -d)
PY=${PY:-.venv-ref/bin/python}
OUT=${OUT:-docs/serve.json}
"$PY" scripts/make_serve_adapters.py --kind decoder --n 64 --out "$W/decoder" >/dev/null
"$PY" scripts/make_serve_adapters.py --kind encoder --n 64 --out "$W/encoder" >/dev/null
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start NAME ARGS...: starts a server, waits for its port; sets $port and $pid.
start() {
  local log="$W/$1.log" pf="$W/$1.port"; shift
  rm -f "$pf"
  "$BIN" serve --port 0 --port-file "$pf" --timeout 600 --max-queue 1024 "$@" >"$log" 2>&1 &
  pid=$!; pids+=("$pid")
  for _ in $(seq 1 600); do [ -s "$pf" ] && break; sleep 0.1; done
  [ -s "$pf" ] || { cat "$log"; exit 1; }
  port=$(cat "$pf")
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# load FILE ENDPOINT MODELS: a load run, its JSON report in FILE.
load() {
  "$BIN" loadgen --json --endpoint "$2" --models "$3" --clients "$CLIENTS" --duration "$DURATION" \
    --max-tokens 16 >"$1" 2>"$1.err" || true
}

results="$W/results.jsonl"
: >"$results"
for kind in decoder encoder; do
  endpoint=completions; [ "$kind" = encoder ] && endpoint=classify
  eight=""; models=""
  for i in 0 1 2 3 4 5 6 7; do
    eight="$eight --adapter a$i=$W/$kind/a$i"; models="$models,a$i"
  done
  models=${models#,}
  echo "== $kind: one server, 8 adapters" >&2
  start "$kind-8" $eight
  rss8=$(rss "$pid")
  url=http://127.0.0.1:$port
  mapfile -t m8 < <(echo "$models" | tr ',' '\n' | sed "s|\$|@$url|")
  load "$W/$kind-mixed.json" "$endpoint" "$(IFS=,; echo "${m8[*]}")"
  echo "== $kind: the same server, 1 adapter" >&2
  load "$W/$kind-one.json" "$endpoint" "a0@$url"
  hwm8=$(hwm "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "== $kind: one process per adapter" >&2
  targets=(); procs=()
  for i in 0 1 2 3 4 5 6 7; do
    start "$kind-p$i" --adapter "a$i=$W/$kind/a$i"
    targets+=("a$i@http://127.0.0.1:$port"); procs+=("$pid")
  done
  rss_procs=0; for p in "${procs[@]}"; do rss_procs=$((rss_procs + $(rss "$p"))); done
  load "$W/$kind-procs.json" "$endpoint" "$(IFS=,; echo "${targets[*]}")"
  hwm_procs=0; for p in "${procs[@]}"; do hwm_procs=$((hwm_procs + $(hwm "$p"))); kill "$p"; done
  wait 2>/dev/null || true
  echo "== $kind: 64 adapters loaded" >&2
  all=""; for i in $(seq 0 63); do all="$all --adapter a$i=$W/$kind/a$i"; done
  start "$kind-64" $all
  rss64=$(rss "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$kind" "$W" "$rss8" "$hwm8" "$rss_procs" "$hwm_procs" "$rss64" >>"$results" <<'PY'
import json, sys
kind, w, rss8, hwm8, rssp, hwmp, rss64 = sys.argv[1:]
r = {"kind": kind}
for k in ("mixed", "one", "procs"):
    r[k] = json.load(open(f"{w}/{kind}-{k}.json"))
r["rss_mib"] = {"8_adapters": int(rss8) / 1024, "8_adapters_peak": int(hwm8) / 1024,
                "8_processes": int(rssp) / 1024, "8_processes_peak": int(hwmp) / 1024,
                "64_adapters": int(rss64) / 1024}
print(json.dumps(r))
PY
done
python3 - "$results" "$OUT" "$DURATION" "$CLIENTS" <<'PY'
import json, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1])]
out = {"duration_s": int(sys.argv[3]), "clients": int(sys.argv[4]), "cpus": os.cpu_count(), "runs": rows}
tmp = sys.argv[2] + ".tmp"
json.dump(out, open(tmp, "w"), indent=1)
os.replace(tmp, sys.argv[2])
print("| base | load | req/s | tokens/s | p50 ms | p99 ms | errors | lost | dup | vs 1 adapter |")
print("|---|---|---|---|---|---|---|---|---|---|")
names = {"mixed": "1 server, 8 adapters", "one": "1 server, 1 adapter", "procs": "8 servers, 1 adapter each"}
for r in rows:
    base = r["one"]["requests_per_s"]
    for k in ("mixed", "one", "procs"):
        x = r[k]
        tok = f"{x['tokens_per_s']:.0f}" if r["kind"] == "decoder" else "-"
        print(f"| {r['kind']} | {names[k]} | {x['requests_per_s']:.1f} | {tok} | {x['p50_ms']:.0f} | "
              f"{x['p99_ms']:.0f} | {x['errors']} | {x['lost']} | {x['duplicated']} | "
              f"{x['requests_per_s'] / base:.2f}x |")
print()
print("| base | RSS, 8 adapters | peak under load | 8 processes (sum) | their peak | RSS, 64 adapters |")
print("|---|---|---|---|---|---|")
for r in rows:
    m = r["rss_mib"]
    print(f"| {r['kind']} | {m['8_adapters']:.0f} MiB | {m['8_adapters_peak']:.0f} MiB | "
          f"{m['8_processes']:.0f} MiB | {m['8_processes_peak']:.0f} MiB | {m['64_adapters']:.0f} MiB |")
PY

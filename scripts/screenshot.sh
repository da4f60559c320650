#!/usr/bin/env bash
# Renders an HTML report (auto-report.html, a study report) to a PNG with headless Chromium,
# to look at it without a desktop:
#
#   bash scripts/screenshot.sh runs/auto-rt/auto-report.html runs/auto-report.png [WIDTHxHEIGHT]
#
# Needs Debian's chromium (`apt-get install chromium`). The flags keep it off the network.
set -euo pipefail
html=$(realpath "$1")
png=$(realpath -m "$2")
size=${3:-1100x1600}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$png" "file://$html" 2>/dev/null
echo "$png"

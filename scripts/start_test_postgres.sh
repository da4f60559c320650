#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server on loopback for the multi-worker search tests and prints
# the URL to use as DELTATUNE_TEST_POSTGRES. Installs Debian's postgresql package when no server
# binaries are found. Usage: eval "$(bash scripts/start_test_postgres.sh)"
set -euo pipefail
PORT="${DT_PG_PORT:-54329}"
DATA="${DT_PG_DATA:-/tmp/deltatune-pg}"
bindir=""
for d in /usr/lib/postgresql/*/bin; do
  [ -x "$d/pg_ctl" ] && bindir="$d"
done
if [ -z "$bindir" ]; then
  echo "installing PostgreSQL (Debian package postgresql)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && bindir="$d"
  done
fi
# The server refuses to run as root: run it as the package's `postgres` user then.
run() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if ! run "$bindir/pg_isready" -h 127.0.0.1 -p "$PORT" -q 2>/dev/null; then
  rm -rf "$DATA"
  mkdir -p "$DATA"
  [ "$(id -u)" -eq 0 ] && chown postgres "$DATA"
  run "$bindir/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 >/dev/null
  run "$bindir/pg_ctl" -D "$DATA" -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1" \
    -l "$DATA/server.log" -w start >/dev/null
fi
run "$bindir/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname = 'deltatune_test'" | grep -q 1 ||
  run "$bindir/createdb" -h 127.0.0.1 -p "$PORT" -U postgres deltatune_test
echo "export DELTATUNE_TEST_POSTGRES=postgres://postgres@127.0.0.1:$PORT/deltatune_test"

#!/usr/bin/env bash
# Write-through cost per turn (issue 15): no store vs --state-dir-write-through vs a Redis
# --session-store, on the built-in model and an 8 MiB-state checkpoint. Prints Markdown.
#
#   scripts/bench-session-store.sh [--turns N] [--out DIR] [--cache DIR]
#
# Needs build/bin/retnet-server, build/python (the generated stubs), redis-server and
# /usr/bin/python3 with torch, grpcio and redis (python3-redis).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/usr/bin/python3}"
exec "$PYTHON" tools/bench_session_store.py "$@"

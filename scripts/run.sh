#!/usr/bin/env bash
# Quick start: builds if needed, then runs retnet-server on the built-in default model
# (listening on 0.0.0.0:50051 unless --listen says otherwise; Ctrl-C drains and stops it).
# Usage: scripts/run.sh [retnet-server flags, e.g. --listen 127.0.0.1:6000 --state-dir /tmp/retnet]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
exec build/bin/retnet-server "$@"

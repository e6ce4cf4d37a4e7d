#!/usr/bin/env bash
# Quick start: builds if needed, then runs the main job on the built-in default model. Until the
# gRPC server lands this is streaming generation (prefill + recurrent decode) with retnet-generate.
# Usage: scripts/run.sh [retnet-generate flags, e.g. --prompt "Once upon a time" --temperature 0.8]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
exec build/bin/retnet-generate "$@"

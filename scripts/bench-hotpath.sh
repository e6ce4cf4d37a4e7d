#!/usr/bin/env bash
# Hot-path benchmark on the CPU (issue 12): the C++ decode step vs an eager PyTorch RetNet,
# gRPC tokens/s vs the model step, and inter-token latency under control work. Prints Markdown.
#
#   scripts/bench-hotpath.sh [--quick] [--out DIR] [--cache DIR] [--bin build/bin]
#
# Needs build/bin/{retnet-bench-model,retnet-server,retnet-client} and build/python (the
# generated stubs); /usr/bin/python3 with torch and grpcio. --quick: a smoke run (< 1 minute).
# Exit status 1 when the greedy tokens of the C++ model and the eager one disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/usr/bin/python3}"
exec "$PYTHON" tools/bench_hotpath.py "$@"

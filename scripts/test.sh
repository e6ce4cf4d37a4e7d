#!/usr/bin/env bash
# The whole test suite: build (installing packages if needed), then every C++ and Python test.
# This is the README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"

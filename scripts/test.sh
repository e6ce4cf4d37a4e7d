#!/usr/bin/env bash
# The whole test suite: build (installing packages if needed), the thread-safety analysis
# (scripts/thread-safety.sh), then every C++ and Python test.
# This is the README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
# Clang's thread-safety analysis of the lock annotations (syntax only, about 30 s on 2 cores).
bash scripts/thread-safety.sh build
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"

#!/usr/bin/env bash
# Installs the Debian packages (when missing), configures and builds retnet-serve into build/.
# Usage: scripts/build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The Node client's pinned dependencies (package-lock.json), for its test.
# Without the registry the Node test reports itself skipped; nothing else depends on it.
if command -v npm >/dev/null 2>&1 && [ ! -d client/node/node_modules/@grpc/grpc-js ]; then
  npm ci --prefix client/node --no-audit --no-fund --loglevel=error >/dev/null ||
    echo "build: npm ci in client/node failed; the Node client test will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1 && [ ! -d tests/model/hf_oracle/node_modules/@huggingface/tokenizers ]; then
  npm ci --prefix tests/model/hf_oracle --no-audit --no-fund --loglevel=error >/dev/null ||
    echo "build: npm ci in tests/model/hf_oracle failed; the HF tokenizer oracle test will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1 && [ ! -d tests/chat/jinja_oracle/node_modules/@huggingface/jinja ]; then
  npm ci --prefix tests/chat/jinja_oracle --no-audit --no-fund --loglevel=error >/dev/null ||
    echo "build: npm ci in tests/chat/jinja_oracle failed; the Jinja oracle test will be skipped" >&2
fi
if command -v npm >/dev/null 2>&1 && [ ! -d tests/server/openai_client/node_modules/openai ]; then
  npm ci --prefix tests/server/openai_client --no-audit --no-fund --loglevel=error >/dev/null ||
    echo "build: npm ci in tests/server/openai_client failed; the OpenAI API test will be skipped" >&2
fi
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
if [ ! -f build/CMakeCache.txt ]; then
  cmake --preset release "$@" >/dev/null
elif [ $# -gt 0 ]; then
  cmake -S . -B build "$@" >/dev/null
fi
cmake --build build -j"$(nproc)"
# retnet-server under AddressSanitizer + UndefinedBehaviorSanitizer for the server_fuzz_asan test
# (build/asan; about 10 minutes cold on 2 cores). RETNET_ASAN_FUZZ=0 skips it (the test then skips).
if [ "${RETNET_ASAN_FUZZ:-1}" != 0 ]; then
  [ -f build/asan/CMakeCache.txt ] || cmake --preset asan >/dev/null
  cmake --build build/asan -j"$(nproc)" --target retnet-server
fi

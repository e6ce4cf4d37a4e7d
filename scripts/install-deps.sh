#!/usr/bin/env bash
# Installs the Debian 12 packages retnet-serve needs to build, test and benchmark.
# Idempotent and quiet when everything is already present. Must run as root
# (or with sudo available) on a fresh machine.
#
#   scripts/install-deps.sh               build, test and benchmark (developer machines, CI)
#   scripts/install-deps.sh --build-only  compile the binaries only (the images' build stage)
set -euo pipefail

# What compiling the binaries needs (cmake -DRETNET_BUILD_TESTS=OFF -DRETNET_BUILD_BENCHMARKS=OFF).
packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp
  libabsl-dev libspdlog-dev nlohmann-json3-dev libcli11-dev libsentencepiece-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libcpp-httplib-dev libxxhash-dev libpcre2-dev libicu-dev libhiredis-dev
)
if [ "${1:-}" != "--build-only" ]; then
  # Tests, benchmarks and tools: GoogleTest, Python with torch/grpcio/redis, clang for the
  # thread-safety analysis, the real Redis and nginx the tests run, compose for its check,
  # podman and mmdebstrap to build and run the images (tests/deploy/test_image.py).
  packages+=(
    python3-torch libgtest-dev libgmock-dev libbenchmark-dev python3-grpcio openssl clang-14
    redis-server python3-redis nginx docker-compose python3-yaml podman mmdebstrap
  )
  # Node.js for the Node client's test: the machine's own (with its npm) when there is one.
  command -v node >/dev/null 2>&1 || packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq >/dev/null
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

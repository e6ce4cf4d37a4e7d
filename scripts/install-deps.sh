#!/usr/bin/env bash
# Installs the Debian 12 packages retnet-serve needs to build, test and benchmark.
# Idempotent and quiet when everything is already present. Must run as root
# (or with sudo available) on a fresh machine.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp python3-torch
  libabsl-dev libspdlog-dev nlohmann-json3-dev libcli11-dev
  libsentencepiece-dev libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  python3-grpcio libcpp-httplib-dev openssl libxxhash-dev clang-14
  libpcre2-dev libicu-dev libhiredis-dev redis-server python3-redis
  nginx docker-compose python3-yaml
)

# Node.js for the Node client's test: the machine's own (with its npm) when there is one.
command -v node >/dev/null 2>&1 || packages+=(nodejs npm)

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

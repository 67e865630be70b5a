#!/usr/bin/env bash
# Build native llama-bench from the llama.cpp tree vendored in the pinned
# llama-cpp-python sdist, so `llmctl bench` can be compared with it on the same
# llama.cpp. Cached outside git; prints the binary's path.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
# Same CPU options as the llama-cpp-python wheel `make setup` builds
# (tools/llama_wheel.py): native, without the AMX kernels on x86-64.
NO_AMX=""
case "$(uname -m)" in x86_64|amd64) NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac
CACHE="${LLMCTL_DEV_CACHE:-$HOME/.cache/llmctl-dev}/llama-bench-$VERSION${NO_AMX:+-noamx}"
BIN="$CACHE/build/bin/llama-bench"
PY="${PYTHON:-python3}"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
if [ ! -d "$CACHE/src" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist" >&2
  mkdir -p "$CACHE/src"
  tar -xzf "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$CACHE/src" --strip-components=1
fi
cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >&2
cmake --build "$CACHE/build" --target llama-bench -j "$(nproc)" >&2
echo "$BIN"

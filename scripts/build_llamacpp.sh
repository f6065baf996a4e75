#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-bench, llama-perplexity, llama-quantize, llama-imatrix)
# and its shared library from the source vendored in the llama-cpp-python sdist, with portable
# x86-64 flags (a -march=native build dies on CPUs that report AMX the kernel has not enabled),
# then install the llama-cpp-python bindings without a second compile: they load our libllama.so
# through LLAMA_CPP_LIB_PATH, which slmkit.export.llamacpp sets.
#
# Optional for users: slmkit works without it; tests and benchmarks that need llama.cpp skip.
# Cached: a finished build (its .stamp) is reused. Usage: scripts/build_llamacpp.sh [PYTHON]
set -euo pipefail
VERSION=0.3.36
PY="${1:-python3}"
ROOT="${SLMKIT_LLAMA_CPP_HOME:-$HOME/.cache/slmkit/llama.cpp-$VERSION}"
BUILD="$ROOT/build"
STAMP="$ROOT/.stamp"
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF"
if [ "$(uname -m)" != "x86_64" ]; then FLAGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"; fi

mkdir -p "$ROOT"
if [ ! -f "$STAMP" ]; then
  if [ ! -d "$ROOT/src" ]; then
    tmp="$(mktemp -d "$ROOT/.tmp-XXXX")"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
    mv "$tmp/llama_cpp_python-$VERSION" "$ROOT/src"
    rm -rf "$tmp"
  fi
  # shellcheck disable=SC2086
  cmake -S "$ROOT/src/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF $FLAGS > "$ROOT/cmake.log"
  cmake --build "$BUILD" -j "$(nproc)" --target llama llama-bench llama-perplexity \
    llama-quantize llama-imatrix > "$ROOT/build.log"
  date -u +%FT%TZ > "$STAMP"
fi
# the bindings, without building llama.cpp a second time
if ! "$PY" -c "import importlib.metadata as m; m.version('llama-cpp-python')" 2>/dev/null; then
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q \
    "$ROOT/src"
fi
echo "llama.cpp $VERSION: $BUILD/bin"

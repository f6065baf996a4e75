#!/usr/bin/env bash
# Build llama.cpp's llama-bench a second time for CPUs without AVX-512: AVX2 + FMA + F16C only (every
# AVX-512, AVX-VNNI and AMX option off), statically linked, into its own directory, so that slmkit's avx2
# kernel (SLMKIT_KERNEL=avx2) can be timed against llama.cpp's AVX2 code on the same machine and file
# (bench/gguf_fast.py --kernel avx2 --llama-bench .../build-avx2/bin/llama-bench).
# Uses the source scripts/build_llamacpp.sh unpacked (fetched here the same way when missing).
# Cached: a finished build (its .stamp-avx2) is reused. Usage: scripts/build_llamacpp_avx2.sh [PYTHON]
set -euo pipefail
VERSION=0.3.36
PY="${1:-python3}"
ROOT="${SLMKIT_LLAMA_CPP_HOME:-$HOME/.cache/slmkit/llama.cpp-$VERSION}"
BUILD="$ROOT/build-avx2"
STAMP="$ROOT/.stamp-avx2"
if [ "$(uname -m)" != "x86_64" ]; then echo "the AVX2 build of llama.cpp is for x86-64" >&2; exit 2; fi
FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DLLAMA_CURL=OFF"

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
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF $FLAGS > "$ROOT/cmake-avx2.log"
  cmake --build "$BUILD" -j "$(nproc)" --target llama-bench > "$ROOT/build-avx2.log"
  # the AVX2 build must not contain AVX-512 code (it would not be an AVX2 baseline)
  if objdump -d "$BUILD/bin/llama-bench" 2>/dev/null | grep -q zmm; then
    echo "$BUILD/bin/llama-bench holds AVX-512 instructions; check $ROOT/cmake-avx2.log" >&2; exit 1
  fi
  date -u +%FT%TZ > "$STAMP"
fi
echo "llama.cpp $VERSION (AVX2): $BUILD/bin/llama-bench"

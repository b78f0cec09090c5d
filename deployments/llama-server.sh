#!/usr/bin/env bash
# Build llama.cpp's own OpenAI-compatible server (`llama-server`) from a pinned source, portably,
# and install it as PREFIX/bin/llama-server.
#
#   deployments/llama-server.sh PREFIX        # e.g. .venv (the Makefile), /usr/local (the Dockerfile)
#
# Source: the llama-cpp-python sdist on PyPI, which vendors llama.cpp (tools/server included),
# fetched with pip (so pip's cache keeps it) and checked against its sha256.
#
# Flags: never -march=native. A native build crashed on CPUs with AMX, and an AVX-512 build dies
# with an illegal instruction on CPUs without it, so the build targets x86-64 with AVX2 (Haswell,
# 2013, and every later Intel and AMD server CPU), with AMX and AVX-512 off.
# ggml's runtime CPU-variant selection (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) is not used: its
# variant list includes `sapphirerapids` with AMX_TILE/AMX_INT8, which it would pick on exactly
# the CPUs where AMX crashes.
#
# The binary is cached by source hash and flags under HOMESKILLET_BUILD_CACHE
# (default ~/.cache/homeskillet), so a second checkout or a rebuilt .venv reuses it (~5 min saved).
set -euo pipefail

PREFIX=${1:?usage: llama-server.sh PREFIX}
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF
  -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
)
# e.g. LLAMA_EXTRA_CMAKE_ARGS="-DGGML_CUDA=ON" on an NVIDIA CUDA devel image
read -r -a extra <<<"${LLAMA_EXTRA_CMAKE_ARGS:-}"
FLAGS+=("${extra[@]}")
key=$(printf '%s\n' "$VERSION" "$SHA256" "${FLAGS[@]}" | sha256sum | cut -c1-12)
cache=${HOMESKILLET_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homeskillet}/llama-server-$VERSION-$key
target=$PREFIX/bin/llama-server

if [ ! -x "$cache/llama-server" ]; then
  for tool in cmake c++ make; do
    command -v "$tool" >/dev/null || { echo "llama-server build: '$tool' is needed (Debian: apt-get install cmake g++ make)" >&2; exit 1; }
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "llama-server: building llama.cpp from llama-cpp-python $VERSION (AVX2, no AMX; ~5 min on 2 cores)"
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
  echo "$SHA256  $work/llama_cpp_python-$VERSION.tar.gz" | sha256sum --check --quiet
  tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
  src=$work/llama_cpp_python-$VERSION/vendor/llama.cpp
  cmake -S "$src" -B "$work/build" "${FLAGS[@]}" >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
  mkdir -p "$cache"
  cp "$work/build/bin/llama-server" "$cache/llama-server.tmp"
  mv "$cache/llama-server.tmp" "$cache/llama-server"
fi
mkdir -p "$PREFIX/bin"
cp "$cache/llama-server" "$target.tmp"
mv "$target.tmp" "$target"
"$target" --version 2>&1 | head -2

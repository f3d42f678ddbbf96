#!/usr/bin/env bash
# Builds the llama.cpp tools this project is checked against, from the source that the
# llama-cpp-python sdist on PyPI vendors (pinned below). Not run by CI.
#   LLAMACPP_HOME  where the source and build are cached (default: ~/.cache/mla-retrofit/llamacpp)
# Prints the bin directory on its last line. Reuses a finished build.
set -euo pipefail
ver=${LLAMACPP_PY_VERSION:-0.3.36}
home=${LLAMACPP_HOME:-$HOME/.cache/mla-retrofit/llamacpp}
src=$home/llama_cpp_python-$ver/vendor/llama.cpp
bin=$src/build/bin
mkdir -p "$home"
if [ ! -x "$bin/llama-perplexity" ] || [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-completion" ] \
   || [ ! -x "$bin/llama-quantize" ] || [ ! -x "$bin/llama-tokenize" ]; then
  if [ ! -d "$src" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$ver" -d "$home" >&2
    tar xzf "$home/llama_cpp_python-$ver.tar.gz" -C "$home"
  fi
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON >&2
  cmake --build "$src/build" -j "$(nproc)" --target llama-perplexity llama-bench llama-completion llama-quantize llama-tokenize >&2
fi
echo "$bin"

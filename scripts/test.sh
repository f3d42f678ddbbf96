#!/usr/bin/env bash
# Set up, then lint (ruff) and run the test suite (tiny random models of every family; no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check mla_retrofit cli tests benchmarks scripts
python3 -m pytest -q "$@"

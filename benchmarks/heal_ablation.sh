#!/usr/bin/env bash
# Which part of the heal's gain each piece brings: the same short budget (STEPS, default 48 = 30% of the
# cpu-demo preset) with one piece changed at a time, every variant scored on held-out prose
# (benchmarks/heldout.py: Austen's Persuasion, never calibrated or healed on).
#
#   bash benchmarks/heal_ablation.sh CONVERTED HEALED_CPU_DEMO_OUT [WORK_DIR]
#
# HEALED_CPU_DEMO_OUT is a finished `heal --preset cpu-demo` run: its teacher samples are reused as
# --data (no variant samples again). Variants run one after another (2 cores).
set -euo pipefail
converted=$1
samples_from=$2
work=${3:-runs/ablation}
steps=${STEPS:-48}
mkdir -p "$work"
run() {  # name, extra heal flags...
  local name=$1; shift
  local out="$work/$name"
  if [ ! -f "$out/conversion.json" ]; then
    local t0=$(date +%s)
    mla-retrofit -q heal "$converted" "$out" --preset cpu-demo --steps "$steps" --overwrite \
      --data "$samples_from/data/teacher-samples.jsonl" "$@" > "$out.log" 2>&1
    echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$work/times.txt"
  fi
}
run kd                                                      # the default: KD in phases 2-3, phase 1 on
run ce         --distill 0 --ce-weight 1 --full-ce-weight 1 # next-token loss instead of KD (same data)
run kd-refit   --refit                                      # + closed-form o_proj refit before phase 1
run kd-no-imitate --split 0,0.67,0.33                       # phase 1 off (its steps go to phases 2-3)
run kd-docstrings --data builtin                            # data: stdlib docstrings instead of teacher samples
python benchmarks/heldout.py --windows "${WINDOWS:-16}" "$converted" "$work"/kd "$work"/ce "$work"/kd-refit \
  "$work"/kd-no-imitate "$work"/kd-docstrings | tee "$work/heldout.txt"

"""Profile one optimizer step of a real heal: where the time of a step goes, per operator.

    python benchmarks/heal_step_profile.py CONVERTED --teacher ORIGINAL --data SAMPLES.jsonl \
        --phase mla-only --step 5 --precision bf16

Runs a short heal (``--steps 8`` of the ``cpu-demo`` preset, output in a temporary directory) and prints
``torch.profiler``'s operator table for the ``--step``-th optimizer step overall if it falls in ``--phase``.
"""

from __future__ import annotations

import argparse
import tempfile

from torch.profiler import ProfilerActivity, profile

from mla_retrofit.heal import HealConfig, heal
from mla_retrofit.heal.loop import PhaseRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--phase", default="mla-only", choices=["imitate", "mla-only", "full"])
    ap.add_argument("--step", type=int, default=5, help="which optimizer step of the run (1-based, all phases)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    plain, seen = PhaseRun.step, [0]

    def step(self, batches):
        seen[0] += 1
        if seen[0] != args.step or self.phase.name != args.phase:
            return plain(self, batches)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            plain(self, batches)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    PhaseRun.step = step
    with tempfile.TemporaryDirectory() as out:
        heal(HealConfig(model=args.model, output=out, teacher=args.teacher, preset="cpu-demo", data=args.data,
                        steps=8, precision=args.precision, overwrite=True), lambda *a, **k: None)


if __name__ == "__main__":
    main()

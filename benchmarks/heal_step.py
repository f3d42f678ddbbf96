"""Where a heal step's time goes: the teacher's forward, the student's forward, the loss, the backward.

    python benchmarks/heal_step.py CONVERTED --teacher smollm2-135m-instruct --phase mla-only --rounds 3

Builds one micro-batch of ``--batch`` windows of ``--seq-len`` tokens from a short built-in text, loads
student and teacher as ``heal`` does (student float32 under the heal's autocast, teacher in the heal's
precision), and times each part of a phase-2 (``mla-only``) or phase-3 (``full``) step, alternating the
distillation loss's two implementations (``fused``: closed-form gradient in the forward; ``checkpointed``:
slices recomputed in the backward) ``--rounds`` times, so a slow stretch of a shared machine hits both.
Prints the median of each part and the ratio of the two step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mla_retrofit.data import builtin_chat
from mla_retrofit.heal import models
from mla_retrofit.heal.data import PackedStream
from mla_retrofit.dtypes import resolve_precision
from mla_retrofit.heal.losses import distill_sums
from mla_retrofit.heal.loop import make_batch
from mla_retrofit.sources import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a converted MLA checkpoint (or a DeepSeek-V3 export)")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--phase", default="mla-only", choices=["mla-only", "full"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()

    precision = resolve_precision(args.precision, cuda=False)
    tok = load_tokenizer(args.model)
    ids, pos, mask = PackedStream(builtin_chat(), tok, args.seq_len, 0).take(args.batch)
    batch = make_batch(ids, pos, mask)
    student = models.load_student(args.model)
    teacher = models.load_teacher(args.teacher, torch.bfloat16 if precision == "bf16" else torch.float32)
    params = models.set_trainable(student, args.phase)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(fused: bool) -> dict[str, float]:
        parts, t0 = {}, time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t0
            parts[name] = time.perf_counter() - t0
            t0 = time.perf_counter()

        with autocast():
            with torch.no_grad():
                teacher_hidden = teacher.model(input_ids=batch.ids, position_ids=batch.positions,
                                               use_cache=False).last_hidden_state
            lap("teacher forward")
            with models.HiddenTap(student.model) as tap:
                student(input_ids=batch.ids, position_ids=batch.positions, use_cache=False, logits_to_keep=1)
            lap("student forward")
            sums = distill_sums(tap.hidden, student.lm_head, teacher_hidden, teacher.lm_head, batch.kd_mask,
                                chunk=1024, fused=fused)
            loss = sums.kl / sums.kl_count
            lap("loss forward")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
        parts["step"] = sum(parts.values())
        return parts

    print(f"precision {precision}, threads {torch.get_num_threads()}, batch {args.batch} x {args.seq_len}, "
          f"phase {args.phase}")
    times: dict[str, dict[str, list[float]]] = {"fused": {}, "checkpointed": {}}
    for _ in range(args.rounds):
        for name in times:
            step(name == "fused")  # warm-up
            for _ in range(args.steps):
                for part, seconds in step(name == "fused").items():
                    times[name].setdefault(part, []).append(seconds)
    for name, parts in times.items():
        print(f"{name:13s} " + "  ".join(f"{part} {statistics.median(v):.2f} s" for part, v in parts.items()))
    ratio = statistics.median(times["checkpointed"]["step"]) / statistics.median(times["fused"]["step"])
    print(f"step time checkpointed / fused: {ratio:.2f}x")


if __name__ == "__main__":
    main()

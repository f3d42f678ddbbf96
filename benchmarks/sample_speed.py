"""Teacher-sample decoding speed: ``sampling.py``'s cached decoder against transformers' ``generate``.

    python benchmarks/sample_speed.py smollm2-135m-instruct --samples 96 --tokens 256 --rounds 2

Draws the same samples (``--samples`` texts of ``--tokens`` new tokens, the heal's prompts, seed 0) with
each decoder in turn, alternating ``--rounds`` times so a slow stretch of a shared machine hits both,
under the precision a heal would pick (``--precision``). Prints each timing, the ratio of the medians,
and how many texts the two decoders agree on (in bf16 the two compute the logits in a different order,
so sampled texts part ways after the first near-tie; in float32 they agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mla_retrofit import sampling as samples
from mla_retrofit.heal import models
from mla_retrofit.dtypes import resolve_precision
from mla_retrofit.sources import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()

    precision = resolve_precision(args.precision, cuda=torch.cuda.is_available())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher, tok = models.load_teacher(args.teacher, dtype), load_tokenizer(args.teacher)
    print(f"precision {precision}, decodable: {samples.decodable(teacher, 1024)}, threads {torch.get_num_threads()}")
    times: dict[str, list[float]] = {"decode": [], "generate": []}
    texts: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name in ("decode", "generate") if r % 2 == 0 else ("generate", "decode"):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                texts[name] = samples.sample(teacher, tok, args.samples, args.tokens, 0, fast=name == "decode")
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1} {name:<8} {times[name][-1]:7.1f} s")
    fast, slow = statistics.median(times["decode"]), statistics.median(times["generate"])
    same = sum(a == b for a, b in zip(texts["decode"], texts["generate"]))
    print(f"median: decode {fast:.1f} s, generate {slow:.1f} s, generate / decode = {slow / fast:.2f}x; "
          f"identical texts {same}/{args.samples}")


if __name__ == "__main__":
    main()

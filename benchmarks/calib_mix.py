"""Write a calibration file: the texts of a teacher-samples file, then every ``builtin`` docstring.

    python benchmarks/calib_mix.py OUT/data/teacher-samples.jsonl mix.jsonl [--no-builtin]

How §9's first calibration-text comparison (2026-12-04) made its files from a heal's cached samples, before
``convert --calib teacher-samples+builtin`` existed: ``--no-builtin`` gives the samples alone.
"""

from __future__ import annotations

import argparse
import json
import random

from mla_retrofit import data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("out")
    ap.add_argument("--no-builtin", action="store_true")
    args = ap.parse_args()
    lines = open(args.samples, encoding="utf-8").read().splitlines()
    texts = [json.loads(line)["text"] for line in lines[1:] if line.strip()]  # line 1: the settings
    if not args.no_builtin:
        docs = data.builtin_texts("builtin")
        random.Random(0).shuffle(docs)
        texts += docs
    with open(args.out, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


if __name__ == "__main__":
    main()

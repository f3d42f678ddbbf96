"""How often each position of a training window is trained: the heal's packing against plain concatenation.

    python benchmarks/packing_positions.py OUT/data/teacher-samples.jsonl --tokenizer smollm2-135m-instruct \
        --seq-len 512 --windows 640

Packs the file's texts (the heal's training split: ``split_dev`` at 5%, seed 0) into ``--windows`` windows
the way ``heal`` does (``heal/data.py``: whole pieces, first fit) and the way it did until 2026-12-03
(documents concatenated and cut at the window border, positions restarting at each cut), and prints, per
quarter of the window, how many tokens at those positions a window holds on average (1.0 = one per
window), and the share of windows whose last position is the window's last (a piece running through).
"""

from __future__ import annotations

import argparse
import json

import torch

from mla_retrofit.heal.data import PackedStream, split_dev
from mla_retrofit.sources import load_tokenizer


def concatenated(stream: PackedStream, n: int) -> torch.Tensor:
    """Positions of the previous packing: documents in the stream's order, cut wherever a window ends."""
    L, pos, filled, epoch = stream.seq_len, [], 0, 0
    while filled < n * L:
        for i in stream._order(epoch):
            length, done = len(stream._encoded(i)[0]), 0
            while done < length and filled < n * L:
                k = min(length - done, n * L - filled, L - filled % L)
                pos.append(torch.arange(k))
                filled, done = filled + k, done + k
        epoch += 1
    return torch.cat(pos).view(n, L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=640)
    args = ap.parse_args()
    lines = open(args.data, encoding="utf-8").read().splitlines()
    texts = [json.loads(line)["text"] for line in lines[1:] if line.strip()]
    train, _ = split_dev(texts, 0.05, 0)
    tok, L = load_tokenizer(args.tokenizer), args.seq_len
    for name, pos in (("heal (whole pieces, first fit)", PackedStream(train, tok, L, 0).take(args.windows)[1]),
                      ("plain concatenation", concatenated(PackedStream(train, tok, L, 0), args.windows))):
        counts = torch.bincount(pos.flatten().long() * 4 // L, minlength=4).float() / args.windows / (L / 4)
        full = float((pos[:, -1] == L - 1).float().mean())
        print(f"{name:<32} tokens per position per window by quarter: "
              f"{' / '.join(f'{c:.2f}' for c in counts.tolist())}; windows ending at position {L - 1}: {full:.0%}")


if __name__ == "__main__":
    main()

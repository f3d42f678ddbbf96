"""Peak memory of the chunked distillation loss at Qwen2.5-7B's output shape (hidden 3584, vocabulary 152,064).

Runs forward + backward of ``heal.losses.distill_sums`` on random hidden states
(gradient into the student's hidden states only: heal never trains ``lm_head``)
and random (float32) output heads in a fresh process each, and reports the peak
RSS above the process's resident weights, for a few chunk sizes. Each slice of
``--chunk`` tokens holds its own logits, so the loss's peak depends on the
chunk, not on the batch: the default 2 x 1024 tokens stands for any batch (the
4 x 2048 of the gpu-7b preset adds only its hidden states, 4 x 2048 x 3584 x 4 B
= 117 MB, and their gradient). Both forms of the loss are measured: ``fused`` (what
heal runs: the gradient computed in the forward) and ``checkpointed``.

    python benchmarks/kd_loss_memory.py [--tokens 2048] [--chunks 256,1024] [--forms fused,checkpointed]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from mla_retrofit.heal.losses import distill_sums
tokens, chunk, d, V = (int(a) for a in sys.argv[1:5])
fused = sys.argv[5] == "fused"
torch.manual_seed(0)
head = torch.nn.Linear(d, V, bias=False).requires_grad_(False)  # heal never trains lm_head / embeddings
teacher_head = torch.nn.Linear(d, V, bias=False).requires_grad_(False)
hidden = torch.randn(2, tokens // 2, d, requires_grad=True)
teacher_hidden = torch.randn(2, tokens // 2, d)
mask = torch.ones(2, tokens // 2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sums = distill_sums(hidden, head, teacher_hidden, teacher_head, mask, chunk=chunk, fused=fused)
(sums.kl / sums.kl_count).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"form": sys.argv[5], "tokens": tokens, "chunk": chunk, "weights_mb": base / 1024, "loss_peak_mb": (peak - base) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunks", default="256,1024")
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--forms", default="fused,checkpointed", help="the loss's forms to measure (heal uses fused)")
    args = ap.parse_args()
    for form in args.forms.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.tokens), str(chunk), str(args.hidden),
                                  str(args.vocab), form], check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            slice_mb = chunk * args.vocab * 4 / 2**20
            print(json.dumps({**row, "one_fp32_logit_slice_mb": round(slice_mb, 1),
                              "unchunked_fp32_logits_4x2048_mb": round(4 * 2048 * args.vocab * 4 / 2**20, 1)}))

if __name__ == "__main__":
    main()

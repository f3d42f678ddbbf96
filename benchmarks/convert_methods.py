"""One-shot fidelity of the conversion methods on the embedded SmolLM2-135M-Instruct.

Converts the model with each method at each KV ratio, then measures perplexity,
KL(original || converted) and top-1 agreement on held-out text (the Python
Language Reference, ``builtin-eval``), which no calibration text comes from.

    python benchmarks/convert_methods.py --methods mla,rorope-pca,weight-svd --ratios 0.5,0.25
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from mla_retrofit import data
from mla_retrofit.bench.fidelity import compare
from mla_retrofit.convert.pipeline import ConvertConfig, convert
from mla_retrofit.sources import EMBEDDED_DEFAULT, load_model, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=EMBEDDED_DEFAULT)
    ap.add_argument("--methods", default="mla,rorope-pca,weight-svd")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--extra", default="", help="extra ConvertConfig fields as JSON, e.g. '{\"propagate\": \"converted\"}'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    source = resolve(args.model)
    tok = source.tokenizer()
    ids = data.token_windows(data.texts("builtin-eval"), tok, args.eval_samples, args.eval_seq_len)
    baseline = load_model(args.model)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "mla"
                t0 = time.time()
                cfg = ConvertConfig(model=args.model, output=str(out), kv_ratio=ratio, method=method,
                                    calib_samples=args.calib_samples, **json.loads(args.extra or "{}"))
                res = convert(cfg, source=source)
                secs = time.time() - t0
                model = load_model(str(out))
                fid = compare(model, baseline, ids)
                row = {"method": method, "kv_ratio": ratio, "kv_measured_ratio": res.kv_ratio,
                       "convert_seconds": round(secs, 1), **fid.as_dict(),
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Ablations of the default conversion on the embedded SmolLM2-135M-Instruct, one conversion each.

    python benchmarks/variants.py --ratio 0.5 --variants '{"base": {}, "uniform": {"rank_allocation": "uniform"}}'
    python benchmarks/variants.py --ratio 0.125,0.25,0.5 --variants '{"exportable": {"rope_dim": {"0.25": 32}}}'

Each variant is a set of ConvertConfig overrides; the calibration text sampled from the source (the default) is
sampled once per draw and shared by the variants. Fidelity is measured on held-out text: ``--text
persuasion`` (Austen's novel, another domain than the calibration, see heldout.py; the default) or
``builtin-eval`` (the Python Language Reference, the calibration's own domain).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mla_retrofit import data
from mla_retrofit.bench.fidelity import compare
from mla_retrofit.convert.config import calib_parts
from mla_retrofit.convert.pipeline import ConvertConfig, convert
from mla_retrofit.sources import EMBEDDED_DEFAULT, load_model, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=EMBEDDED_DEFAULT)
    ap.add_argument("--ratio", default="0.5", help="KV fraction, or several comma-separated (every variant at each)")
    ap.add_argument("--variants", required=True, help="JSON object: name -> ConvertConfig overrides")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the conversion's own")
    ap.add_argument("--text", choices=["persuasion", "builtin-eval"], default="persuasion")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    source = resolve(args.model)
    tok = source.tokenizer()
    if args.text == "persuasion":
        sys.path.insert(0, str(Path(__file__).parent))
        from heldout import windows

        ids = windows(tok, args.eval_samples, args.eval_seq_len)
    else:
        ids = data.token_windows(data.texts("builtin-eval"), tok, args.eval_samples, args.eval_seq_len)
    baseline = load_model(args.model)
    rows = []
    runs = [(float(r), name, ov) for r in args.ratio.split(",") for name, ov in json.loads(args.variants).items()]
    shared = tempfile.TemporaryDirectory()
    for ratio, name, overrides in runs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            # a variant may name its own budget (kv_ratio, kv_dim, rank) or rope_dim per ratio ({"0.25": 32, ...})
            overrides = {k: (v.get(str(ratio)) if isinstance(v, dict) else v) for k, v in overrides.items()}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            budget = {} if {"kv_dim", "rank", "kv_ratio"} & set(overrides) else {"kv_ratio": ratio}
            cfg = ConvertConfig(model=args.model, output=str(Path(tmp) / "m"), calib_samples=args.calib_samples,
                                **budget, **overrides)
            parts = calib_parts(cfg.calib)
            if data.TEACHER_SAMPLES in parts:  # sample the source once: every variant of a draw reads the same
                # text (a conversion from its saved samples is identical to one that samples, tests/test_convert.py)
                i = parts.index(data.TEACHER_SAMPLES)
                share = cfg.calib_samples // len(parts) + (i < cfg.calib_samples % len(parts))
                cache = Path(shared.name) / f"{share}-{cfg.calib_seq_len}-{cfg.calib_seed}.jsonl"
                if not cache.is_file():
                    from mla_retrofit.convert.teacher import calibration_texts

                    calibration_texts(args.model, tok, share, cfg.calib_seq_len, cfg.calib_seed, cache,
                                      loaded=source.model)
                parts[i] = str(cache)
                cfg = ConvertConfig(**{**cfg.as_dict(), "calib": "+".join(parts)})
            res = convert(cfg, source=source)
            fid = compare(load_model(str(Path(tmp) / "m")), baseline, ids)
            row = {"variant": name, "text": args.text, "target_ratio": ratio, "overrides": overrides, "kv_ratio": res.kv_ratio,
                   "convert_seconds": round(time.time() - t0, 1), **fid.as_dict(),
                   "mean_attn_error": sum(r.attn_error for r in res.layers) / len(res.layers),
                   "value_fit_attention_layers": sum(r.value_fit == "attention" for r in res.layers)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

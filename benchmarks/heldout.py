"""Fidelity on held-out English prose of another domain: Jane Austen's *Persuasion* (1818, public domain).

The text comes from Debian's ``r-cran-janeaustenr`` package (Austen's novels as
R data); nothing in mla-retrofit calibrates, heals or evaluates on it by
default, so it measures recovery, not domain adaptation. This script fetches
the package with ``apt-get download`` (no install), reads the R data with the
``rdata`` PyPI package, caches the novel as text, and scores each model against
the original on the same windows: perplexity ratio, KL(original || model) and
top-1 agreement.

    python benchmarks/heldout.py runs/smollm2-mla runs/smollm2-mla-healed [--windows 24 --seq-len 512]

Prints one JSON line per model (and a table).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

CACHE = Path(os.environ.get("MLA_HELDOUT_CACHE", Path.home() / ".cache" / "mla-retrofit" / "heldout"))
NOVEL = "persuasion"


def novel_text(name: str = NOVEL) -> str:
    """The novel as plain text (fetched from Debian's r-cran-janeaustenr once, then cached)."""
    path = CACHE / f"{name}.txt"
    if path.is_file():
        return path.read_text()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        data = next(Path(tmp, "x").rglob("janeaustenr/data"))
        for novel, text in _read_rdb(data).items():
            (CACHE / f"{novel}.txt").write_text(text)
    return path.read_text()


def _read_rdb(data: Path) -> dict[str, str]:
    """R's lazy-load database (Rdata.rdx index + Rdata.rdb zlib chunks) -> {object name: lines joined}."""
    try:
        import rdata
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "rdata"], check=True)
        import rdata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
        blob = (data / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(blob[offset + 4 : offset + length])  # 4-byte length, then a zlib stream
            out[str(name)] = "\n".join(str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(raw)))
    return out


def windows(tokenizer, n: int, seq_len: int):
    import torch

    text = novel_text()
    text = text[text.index("Chapter 1") :]  # skip the title page
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        raise SystemExit(f"the novel holds {len(ids)} tokens, fewer than {n} x {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main() -> None:
    import torch

    from mla_retrofit.bench.fidelity import compare
    from mla_retrofit.sources import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--baseline", default="smollm2-135m-instruct")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--buckets", type=int, default=4, help="also give the KL over this many spans of positions")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_model(args.baseline)
    ids = windows(load_tokenizer(args.baseline), args.windows, args.seq_len)
    rows = []
    for name in args.models:
        f = compare(load_model(name), baseline, ids, buckets=args.buckets)
        row = {"model": name, "text": f"Austen, Persuasion ({ids.numel()} tokens)", **f.as_dict()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    span = (args.seq_len - 1) / max(args.buckets, 1)
    spans = "  ".join(f"{round(i * span)}-{round((i + 1) * span) - 1}" for i in range(args.buckets))
    print(f"\n{'model':<44} {'ppl ratio':>9} {'KL':>7} {'top-1':>6}   KL by position ({spans})")
    for r in rows:
        by = " ".join(f"{v:.3f}" for v in r["kl_by_position"])
        print(f"{r['model']:<44} {r['ppl_ratio']:>9.3f} {r['kl']:>7.4f} {r['top1_agreement']:>6.1%}   {by}")


if __name__ == "__main__":
    main()

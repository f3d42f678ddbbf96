"""Build a calibration (or healing) JSONL from local text files, in the schemas the CLI accepts.

    python examples/make_calibration_jsonl.py notes/*.md --out calib.jsonl           # {"text": ...} rows
    python examples/make_calibration_jsonl.py faq.txt --chat --out chats.jsonl         # {"messages": [...]} rows

Then: mla-retrofit convert MODEL OUT --calib calib.jsonl
      mla-retrofit heal OUT HEALED --data chats.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chat", action="store_true", help="Q/A pairs: paragraphs alternate question, answer")
    args = ap.parse_args()
    rows = []
    for f in args.files:
        paragraphs = [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if args.chat:
            for q, a in zip(paragraphs[::2], paragraphs[1::2]):
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            rows.extend({"text": p} for p in paragraphs)
    with args.out.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()

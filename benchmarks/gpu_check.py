"""CUDA checks and GPU decode speed, in one run (the GPU machine is lent in short slots: keep it one script).

    python benchmarks/gpu_check.py --out gpu_check.json [--sections correctness,healing,speed] [--layers 32]

1. Correctness on CUDA, tiny random models of each family converted here (fp32, TF32 off; the calibration
   text sampled from each on the GPU, recorded as ``calib_samples_device``): lossless
   conversion reproduces the original's logits; cached greedy decode equals the full forward; absorbed
   equals expanded attention; static and dynamic caches generate the same tokens; measured cache bytes
   after generate() equal the analytic figure; bf16 runs and its KL to fp32 is reported.
2. Healing on CUDA: a few steps of all three phases (default engine: accelerate, one process), then resume.
3. Speed: random-init models with Llama-3-8B's shape (GQA, 8 KV heads) and its MLA form at half the KV
   cache (rank 960 + 64 RoPE dims per layer), bf16, alternated in one run by ``compare_speed``, with each
   model's default (dynamic) cache, with preallocated static caches, and static caches decoded through
   torch.compile (CUDA graphs). Weights are random: speed does not depend on their values.
Prints one JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def correctness(tmp: Path) -> dict:
    from tiny import FAMILIES, save_tiny
    from transformers import AutoModelForCausalLM

    from mla_retrofit.bench.kv import measure_generate
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    dev = torch.device("cuda")
    out = {}
    for family in FAMILIES:
        src = save_tiny(family, tmp / f"{family}-src")
        row = {}
        for ratio in (1.0, 0.5):
            dst = tmp / f"{family}-{ratio}"
            convert(ConvertConfig(model=str(src), output=str(dst), kv_ratio=ratio, calib_samples=8, calib_seq_len=96,
                                  eval_samples=2, eval_seq_len=64))
        # the default calibration text is sampled from the source: on the GPU when there is one
        with open(tmp / f"{family}-0.5" / "data" / "teacher-samples.jsonl") as f:
            row["calib_samples_device"] = json.loads(f.readline())["device"]
        orig = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="sdpa").to(dev).eval()
        lossless = AutoModelForCausalLM.from_pretrained(str(tmp / f"{family}-1.0"), trust_remote_code=True,
                                                        attn_implementation="sdpa").to(dev).eval()
        mla = AutoModelForCausalLM.from_pretrained(str(tmp / f"{family}-0.5"), trust_remote_code=True,
                                                   attn_implementation="sdpa").to(dev).eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 512, (2, 48), generator=g).to(dev)
        with torch.no_grad():
            row["lossless_rel_err"] = rel(lossless(ids).logits, orig(ids).logits)
            prompt = ids[:1, :12]
            gen = mla.generate(prompt, max_new_tokens=16, do_sample=False)
            full = mla(gen, use_cache=False).logits
            o = mla(prompt, use_cache=True)
            cache, steps = o.cache, [o.logits[:, -1]]
            for t in range(prompt.shape[1], gen.shape[1] - 1):
                o = mla(gen[:, t : t + 1], cache=cache, use_cache=True)
                steps.append(o.logits[:, -1])
            row["cached_decode_rel_err"] = rel(torch.stack(steps, 1), full[:, prompt.shape[1] - 1 : -1])
            res = {}
            for mode in ("expanded", "absorbed"):
                for layer in mla.model.layers:
                    layer.self_attn.attn_mode = mode
                pre = mla(ids[:, :40], use_cache=True)
                step = mla(ids[:, 40:], cache=pre.cache, use_cache=True)
                res[mode] = torch.cat([pre.logits, step.logits], 1)
            for layer in mla.model.layers:
                layer.self_attn.attn_mode = "auto"
            row["absorbed_vs_expanded_rel_err"] = rel(res["absorbed"], res["expanded"])
            sta = mla.generate(prompt, max_new_tokens=10, do_sample=False, cache_implementation="static")
            dyn = mla.generate(prompt, max_new_tokens=10, do_sample=False)
            row["static_equals_dynamic"] = bool(torch.equal(sta, dyn))
            m = measure_generate(mla, ids[:, :10], new_tokens=7)
            row["measured_bytes"], row["analytic_bytes"] = m.measured_bytes, m.analytic_bytes
            ref = mla(ids).logits.float().log_softmax(-1)
            low = mla.to(torch.bfloat16)(ids).logits.float().log_softmax(-1)
            row["bf16_kl_vs_fp32"] = float((ref.exp() * (ref - low)).sum(-1).mean())
            row["bf16_generate_ok"] = mla.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] == 16
        row["ok"] = (row["lossless_rel_err"] <= 1e-4 and row["cached_decode_rel_err"] <= 1e-4
                     and row["absorbed_vs_expanded_rel_err"] <= 1e-4 and row["static_equals_dynamic"]
                     and row["measured_bytes"] == row["analytic_bytes"])
        out[family] = row
        print(family, row, flush=True)
    return out


def healing(tmp: Path) -> dict:
    from mla_retrofit.heal import HealConfig, heal

    mla = tmp / "llama-0.5"
    base = dict(model=str(mla), data="builtin-chat", seq_len=64, batch_size=4, grad_accum=1, lr=1e-3,
                warmup_fraction=0.0, save_every=1)
    t0 = time.time()
    heal(HealConfig(output=str(tmp / "healed-full"), steps=6, **base))
    full_s = time.time() - t0

    def stop(phase, step, total, metrics):
        if (phase, step) == ("mla-only", 1):
            raise KeyboardInterrupt

    cfg = HealConfig(output=str(tmp / "healed-resumed"), steps=6, **base)
    try:
        heal(cfg, progress=stop)
    except KeyboardInterrupt:
        pass
    heal(HealConfig(output=str(tmp / "healed-resumed"), steps=6, resume=True, **base))
    from safetensors.torch import load_file

    a = load_file(str(tmp / "healed-full" / "model.safetensors"))
    b = load_file(str(tmp / "healed-resumed" / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # the default data: text sampled from the teacher on the GPU, then distilled on (3 steps)
    t0 = time.time()
    sampled = heal(HealConfig(model=str(mla), output=str(tmp / "healed-samples"), data="teacher-samples", samples=8,
                              sample_tokens=48, seq_len=64, batch_size=4, grad_accum=1, steps=3, warmup_fraction=0.0))
    with open(tmp / "healed-samples" / "data" / "teacher-samples.jsonl") as f:
        header = json.loads(f.readline())
    return {"steps": 6, "seconds": full_s, "resume_max_abs_diff": diff, "device": torch.cuda.get_device_name(0),
            "teacher_samples_heal": {"seconds": time.time() - t0, "sample_precision": header["precision"],
                                     "dev_kl": [e.get("kl") for e in sampled.evals]}}


def speed(layers: int, cases: list[tuple[int, int, tuple[str, ...]]], on_row=None) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mla_retrofit.bench.speed import compare_speed
    from mla_retrofit.modeling.configuration_mla import MLARetrofitConfig
    from mla_retrofit.modeling.modeling_mla import MLARetrofitForCausalLM

    shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                 num_attention_heads=32, head_dim=128, max_position_embeddings=65536, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            gqa = LlamaForCausalLM(LlamaConfig(num_key_value_heads=8, **shape)).eval()
            mla = MLARetrofitForCausalLM(MLARetrofitConfig(
                kv_groups=8, num_key_value_heads=8, kv_lora_ranks=[960] * layers,
                rope_freq_idx=[list(range(32))] * layers, **shape)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    for m in (gqa, mla):
        m.config._attn_implementation = "sdpa"
    rows = []
    for context, batch, kinds in cases:
        for kind in kinds:
            cache, compiled = kind.split("+")[0], kind.endswith("+compile")
            try:
                c = compare_speed(mla, gqa, context, batch, steps=16, rounds=3, cache=cache, compile=compiled)
                row = {"context": context, "batch": batch, **c.as_dict()}
            except torch.OutOfMemoryError as e:
                row = {"context": context, "batch": batch, "cache": cache, "compiled": compiled,
                       "error": f"out of memory: {e}"[:200]}
            torch.cuda.empty_cache()
            rows.append(row)
            if on_row:
                on_row(rows)
            print({k: row.get(k) for k in ("context", "batch", "cache", "compiled", "decode_ratio", "prefill_ratio",
                                           "error")}, flush=True)
    return rows


# Eager rows first; compiled rows (a compile per shape, about a minute each) last, most telling first.
CASES = [(8192, 1, ("dynamic", "static")), (32768, 1, ("dynamic", "static")), (8192, 8, ("dynamic", "static")),
         (8192, 8, ("static+compile",)), (32768, 1, ("static+compile",)), (8192, 1, ("static+compile",))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sections", default="correctness,healing,speed")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    sections = args.sections.split(",")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, fn in (("correctness", lambda: correctness(tmp)), ("healing", lambda: healing(tmp))):
            if name not in sections:
                continue
            t0 = time.time()
            try:
                result[name] = fn()
            except Exception:  # report and go on: one broken section must not hide the others
                result[name] = {"error": traceback.format_exc()}
            result[f"{name}_seconds"] = time.time() - t0
            save()
            print(name, "done", flush=True)
    if "speed" in sections:
        t0 = time.time()

        def on_row(rows):
            result["speed"] = rows
            result["speed_seconds"] = time.time() - t0
            save()

        try:
            speed(args.layers, CASES, on_row)
        except Exception:
            result["speed_error"] = traceback.format_exc()[-2000:]
        result["speed_seconds"] = time.time() - t0
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""``bench``: the KV report, fidelity against the baseline and speed, in one run, as one JSON document.

JSON schema (version 1), every section present only when it ran::

    {"schema": 1, "model": str, "baseline": str | null, "command": str, "machine": {...},
     "runtime": {"device", "weights_dtype", "attn_implementation"},
     "kv_report": {"dtype": str, "dtype_bytes": int,
                   "per_layer": [{"layer", "rank", "rope_dim", "values", "baseline_values"}],
                   "engines": [{"engine", "runs", "shape", "values_per_token", "vs_native", "vs_original", "how"}] | null,
                   "values_per_token": {"model", "baseline"}, "bytes_per_token": {"model", "baseline"},
                   "table": [{"context", "batch", "model_bytes", "baseline_bytes"}],
                   "fit": {"memory_bytes", "weights_bytes", "max_context_batch1": {"model", "baseline"},
                           "max_batch": [{"context", "model", "baseline"}]},
                   "measured": {"model": {...GenerateMeasurement}, "baseline": {...}}},
     "fidelity": {"text", "tokens", "ppl_model", "ppl_baseline", "ppl_ratio", "kl", "top1_agreement"},
     "speed": [{"context", "batch", "cache", "compiled", "model": {...SpeedPoint}, "baseline": {...}, "decode_ratio",
                "prefill_ratio"}],
     "tasks": {NAME: {"problems": [task_id], "model": {...}, "baseline": {...}, "paired": {...Paired}}}}

``speed[].cache`` and ``speed[].compiled`` (added in 0.2, still schema 1): ``dynamic`` is each model's default
``generate()`` cache, ``static`` both models on a preallocated ``StaticCache``; ``compiled`` is true when the
decode steps ran through ``torch.compile`` (CUDA graphs on a GPU). ``tasks`` (0.3, still schema 1): per model
``pass_at_1``, ``passed``, ``problems``, ``generate_seconds``, ``execute_seconds`` and ``results`` (task_id,
completion, passed, status, detail), see :mod:`.tasks`.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict

import torch

from .. import __version__, data, dtypes
from ..architectures import is_mla
from ..errors import UserError
from ..sources import load_model, load_tokenizer, recorded_source
from .config import BenchConfig, flash_attn_available  # noqa: F401  (BenchConfig is imported from here too)
from . import fidelity as fid
from . import kv, speed

SCHEMA_VERSION = 1


def runtime(cfg: BenchConfig) -> tuple[torch.device, torch.dtype, str]:
    """Where and how the models run: CUDA when present (bf16, flash-attn when installed), else CPU float32."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = (dtypes.weight_dtype(cfg.weights_dtype) if cfg.weights_dtype != "auto" else
             torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = cfg.attn
    if attn == "auto":
        attn = "flash_attention_2" if device.type == "cuda" and dtype != torch.float32 and flash_attn_available() else "sdpa"
    return device, dtype, attn


def default_baseline(model_dir: str) -> str | None:
    return recorded_source(model_dir)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "mla_retrofit": __version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def kv_report(cfg: BenchConfig, model, baseline, tokenizer) -> dict:
    dtype_bytes = dtypes.cache_bytes(cfg.dtype)
    mvals = kv.cache_values_per_layer(model.config)
    bvals = kv.cache_values_per_layer(baseline.config) if baseline is not None else None
    c = model.config
    per_layer = []
    for i, v in enumerate(mvals):
        row = {"layer": i, "values": v, "baseline_values": bvals[i] if bvals else None}
        if is_mla(c):
            row.update(rank=c.kv_lora_ranks[i], rope_dim=2 * len(c.rope_freq_idx[i]))
        per_layer.append(row)
    contexts, batches = kv.parse_tokens(cfg.contexts), kv.parse_tokens(cfg.batches)
    table = [{"context": t, "batch": b, "model_bytes": sum(mvals) * t * b * dtype_bytes,
              "baseline_bytes": sum(bvals) * t * b * dtype_bytes if bvals else None}
             for t in contexts for b in batches]
    memory = kv.parse_size(cfg.memory)
    weights = sum(p.numel() for p in model.parameters()) * dtype_bytes
    bweights = sum(p.numel() for p in baseline.parameters()) * dtype_bytes if baseline is not None else None
    fit = {"memory_bytes": memory, "weights_bytes": weights, "baseline_weights_bytes": bweights,
           "max_context_batch1": {
               "model": kv.largest_fit(c, memory, weights, dtype_bytes, batch=1),
               "baseline": kv.largest_fit(baseline.config, memory, bweights, dtype_bytes, batch=1) if baseline is not None else None},
           "max_batch": [{"context": t, "model": kv.largest_fit(c, memory, weights, dtype_bytes, context=t),
                          "baseline": kv.largest_fit(baseline.config, memory, bweights, dtype_bytes, context=t)
                          if baseline is not None else None} for t in contexts]}
    device = next(model.parameters()).device
    prompt = tokenizer("The key-value cache of a transformer holds", return_tensors="pt")["input_ids"].to(device)
    measured = {"model": asdict(kv.measure_generate(model, prompt, cfg.generate_tokens))}
    if baseline is not None:
        measured["baseline"] = asdict(kv.measure_generate(baseline, prompt, cfg.generate_tokens))
    engines = None
    if is_mla(c):
        from ..engines import serving_table

        engines = serving_table(list(c.kv_lora_ranks), [2 * len(f) for f in c.rope_freq_idx],
                                sum(bvals) if bvals else None)
    return {"dtype": cfg.dtype, "dtype_bytes": dtype_bytes, "per_layer": per_layer, "engines": engines,
            "values_per_token": {"model": sum(mvals), "baseline": sum(bvals) if bvals else None},
            "bytes_per_token": {"model": sum(mvals) * dtype_bytes, "baseline": sum(bvals) * dtype_bytes if bvals else None},
            "table": table, "fit": fit, "measured": measured}


def run_bench(cfg: BenchConfig, progress=None, command: str | None = None) -> dict:
    """Run the requested sections; ``progress(stage: str)`` is called before each."""
    say = progress or (lambda *_: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    baseline_name = cfg.baseline or default_baseline(cfg.model)
    device, dtype, attn = runtime(cfg)
    say(f"loading models ({device}, {str(dtype).removeprefix('torch.')}, {attn})")
    model = load_model(cfg.model, dtype, attn).to(device)
    baseline = load_model(baseline_name, dtype, attn).to(device) if baseline_name else None
    tokenizer = load_tokenizer(cfg.model)
    result: dict = {"schema": SCHEMA_VERSION, "model": cfg.model, "baseline": baseline_name,
                    "command": command or " ".join(sys.argv), "machine": machine(), "config": cfg.as_dict(),
                    "runtime": {"device": str(device), "weights_dtype": str(dtype).removeprefix("torch."),
                                "attn_implementation": attn}}
    if cfg.kv_report:
        say("kv report")
        result["kv_report"] = kv_report(cfg, model, baseline, tokenizer)
    if cfg.fidelity:
        if baseline is None:
            raise UserError("fidelity needs a baseline: pass --baseline ORIGINAL_MODEL")
        say("fidelity")
        ids = data.token_windows(data.texts(cfg.text, tokenizer), tokenizer, cfg.eval_samples, cfg.eval_seq_len)
        ids = ids.to(device)
        result["fidelity"] = {"text": cfg.text, **fid.compare(model, baseline, ids, buckets=4).as_dict()}
    if cfg.speed:
        if baseline is None:
            raise UserError("speed comparison needs a baseline: pass --baseline ORIGINAL_MODEL")
        result["speed"] = []
        for mode in [c.strip() for c in cfg.speed_cache.split(",")]:
            for context in kv.parse_tokens(cfg.speed_contexts):
                say(f"speed at context {context} ({mode})")
                cmp = speed.compare_speed(model, baseline, context, cfg.speed_batch, cfg.decode_steps,
                                          cfg.decode_rounds, cache="static" if mode == "compiled" else mode,
                                          compile=mode == "compiled")
                result["speed"].append({"context": context, "batch": cfg.speed_batch, **cmp.as_dict()})
    if cfg.task_names:
        from .tasks import run_tasks

        result["tasks"] = run_tasks(cfg.task_names, model, baseline, tokenizer, limit=cfg.task_limit,
                                    max_new_tokens=cfg.task_max_tokens, batch_size=cfg.task_batch,
                                    timeout_s=cfg.task_timeout, say=say)
    return result


def plot(result: dict, path: str) -> None:
    """Cache bytes vs context (both models) and decode tokens/s vs context, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("--plot needs matplotlib: pip install 'mla-retrofit[plot]'") from e
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rep = result.get("kv_report")
    if rep:
        ctx = sorted({r["context"] for r in rep["table"]})
        per = rep["bytes_per_token"]
        axes[0].plot(ctx, [per["model"] * t / 2**30 for t in ctx], "o-", label="MLA (model)")
        if per["baseline"]:
            axes[0].plot(ctx, [per["baseline"] * t / 2**30 for t in ctx], "s--", label="GQA (baseline)")
        axes[0].set(xscale="log", xlabel="context length (tokens)", ylabel=f"KV cache, GiB ({rep['dtype']}, batch 1)",
                    title="KV cache vs context")
        axes[0].legend()
    sp = result.get("speed")
    if sp:
        def kind_of(r):
            return "compiled" if r.get("compiled") else r.get("cache", "dynamic")

        for kind in dict.fromkeys(kind_of(r) for r in sp):
            rows = [r for r in sp if kind_of(r) == kind]
            ctx = [r["context"] for r in rows]
            tag = "" if kind == "dynamic" else f", {kind}"
            axes[1].plot(ctx, [r["model"]["decode_tok_s"] for r in rows], "o-", label=f"MLA (model{tag})")
            axes[1].plot(ctx, [r["baseline"]["decode_tok_s"] for r in rows], "s--", label=f"GQA (baseline{tag})")
        axes[1].set(xlabel="context length (tokens)", ylabel="decode tokens/s", title="Greedy decode speed", ylim=(0, None))
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

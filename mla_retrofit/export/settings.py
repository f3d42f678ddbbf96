"""What a DeepSeek-V3 export is asked to do and what it reports; reading the native config and refusing what
DeepSeek-V3 cannot express; the target's latent rank and dtype."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..architectures import is_mla
from ..errors import UserError
from ..modeling.configuration_mla import MLARetrofitConfig
from .config import ExportConfig  # noqa: F401  (imported from here too)

FLASHMLA_RANK, FLASHMLA_ROPE = 512, 64
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
MLP_AND_NORMS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass
class ExportReport:
    output: str
    source: str
    layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    q_lora_rank: int | None
    rope_parameters: dict
    rope_interleave: bool
    attention_bias: bool
    cache_values_native: int  # per token, all layers
    cache_values_export: int
    cache_breakdown: dict  # where the export's extra cache values go
    exact: bool  # exact re-parameterisation (up to delta_bound and rounding)
    delta_bound: float  # worst-case relative latent/query shrink from the constant channels
    engine_compatible: bool  # no known reason (from reading vLLM's source; not run) for engines to compute another function
    fidelity: dict | None  # measured against the native model (KL per token etc.)
    fidelity_note: str = ""
    notes: list[str] = field(default_factory=list)
    dropped_biases: dict = field(default_factory=dict)  # engine form: native bias left out -> largest |value|
    residual_scale: float = 1.0  # engine form: residual stream scaled so that every RMSNorm can use eps 1e-6
    seconds: float = 0.0

    @property
    def cache_ratio(self) -> float:
        return self.cache_values_export / self.cache_values_native


# -- reading and refusing ----------------------------------------------------------------------------

def read_native_config(model_dir: Path) -> tuple[MLARetrofitConfig, str]:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{model_dir} has no config.json; pass the directory written by `mla-retrofit convert`")
    raw = json.loads(cfg_file.read_text())
    if not is_mla(raw):
        raise UserError(
            f"{model_dir} is a '{raw.get('model_type')}' checkpoint, not a native MLA one; export the output of "
            "`mla-retrofit convert`"
        )
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    keep = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "auto_map", "architectures")}
    return MLARetrofitConfig(**keep), dtype


def refuse_inexpressible(cfg: MLARetrofitConfig) -> None:
    if cfg.latent_input != "hidden" or cfg.qk_norm:
        raise UserError(
            "this model (Qwen3-style) computes its latent from RMS-normalised keys and normalises each query head; "
            "DeepSeek-V3's latent is linear in the hidden state and its queries have no per-head norm, so it cannot "
            "be exported: serve the native checkpoint (trust_remote_code) instead"
        )
    if cfg.mlp_bias:
        raise UserError("the MLPs have biases; DeepSeek-V3's dense MLP has none, so the model cannot be exported")
    if cfg.num_attention_heads % cfg.kv_groups:
        raise UserError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of kv_groups {cfg.kv_groups}")


def plan_rank(ranks: list[int], extra: int, pad_ranks: bool, flashmla: bool) -> int:
    need = max(ranks) + extra
    if flashmla:
        if need > FLASHMLA_RANK:
            raise UserError(
                f"FlashMLA needs kv_lora_rank {FLASHMLA_RANK}; this latent needs {need} channels "
                f"(rank {max(ranks)} + {extra} constant): re-convert with --rank {FLASHMLA_RANK - extra} or less"
            )
        return FLASHMLA_RANK
    if len(set(ranks)) > 1 and not pad_ranks:
        extra_vals = sum(max(ranks) - r for r in ranks)
        raise UserError(
            f"latent ranks differ across layers ({min(ranks)}..{max(ranks)}) but DeepSeek-V3 has one kv_lora_rank: "
            f"pass --pad-ranks (zero-pads to {max(ranks)}, +{extra_vals} cache values per token) or re-convert "
            "with --engine (or --rank-allocation uniform)"
        )
    return need


def out_dtype(name: str, native: str, notes: list[str]) -> torch.dtype:
    if name != "auto":
        return dtypes.weight_dtype(name)
    native = dtypes.canonical(native, "config.json dtype") if native else "float32"
    if native == "float16":
        notes.append("native weights are float16; the export is written in bfloat16 (the constant latent channel "
                     "needs bfloat16's exponent range)")
        return torch.bfloat16
    return dtypes.weight_dtype(native)

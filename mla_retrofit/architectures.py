"""Supported GQA families, described as data.

Adding a family is adding an :class:`ArchSpec` to :data:`ARCHITECTURES` and a
tiny-model test. Code exists only for the exceptions (the Qwen3 q/k norms).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    hf_module: str  # transformers module holding the family's decoder layer and rotary embedding
    decoder_layer: str
    rotary_embedding: str
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    layer_prefix: str = "model.layers.{i}."
    notes: str = ""

    def layer_class(self):
        return getattr(importlib.import_module(self.hf_module), self.decoder_layer)

    def rotary_class(self):
        return getattr(importlib.import_module(self.hf_module), self.rotary_embedding)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",
        model_types=("llama",),
        hf_module="transformers.models.llama.modeling_llama",
        decoder_layer="LlamaDecoderLayer",
        rotary_embedding="LlamaRotaryEmbedding",
        notes="Llama 2/3/3.1 (incl. llama3 RoPE scaling), SmolLM2",
    ),
    ArchSpec(
        family="qwen2",
        model_types=("qwen2",),
        hf_module="transformers.models.qwen2.modeling_qwen2",
        decoder_layer="Qwen2DecoderLayer",
        rotary_embedding="Qwen2RotaryEmbedding",
        notes="Qwen2 / Qwen2.5 (q/k/v biases)",
    ),
    ArchSpec(
        family="qwen3",
        model_types=("qwen3",),
        hf_module="transformers.models.qwen3.modeling_qwen3",
        decoder_layer="Qwen3DecoderLayer",
        rotary_embedding="Qwen3RotaryEmbedding",
        qk_norm=True,
        notes="Qwen3 dense (per-head q/k RMSNorm before RoPE)",
    ),
    ArchSpec(
        family="mistral",
        model_types=("mistral",),
        hf_module="transformers.models.mistral.modeling_mistral",
        decoder_layer="MistralDecoderLayer",
        rotary_embedding="MistralRotaryEmbedding",
        notes="Mistral 7B and relatives",
    ),
)

SUPPORTED = ", ".join(t for a in ARCHITECTURES for t in a.model_types)

#: ``model_type`` of the native MLA checkpoints convert and heal write.
MLA_MODEL_TYPE = "mla_retrofit"


def is_mla(config) -> bool:
    """True for a native MLA checkpoint's config (a config object or a ``config.json`` mapping)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return kind == MLA_MODEL_TYPE


def spec_for(config) -> ArchSpec:
    """The family of a transformers config, or a one-line :class:`UserError` saying what is supported."""
    model_type = getattr(config, "model_type", None)
    if is_mla(config):
        raise UserError("this model is already an MLA retrofit; convert its source model instead")
    if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        raise UserError(f"'{model_type}' already uses Multi-head Latent Attention; nothing to convert")
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            check_config(config)
            return spec
    raise UserError(f"unsupported architecture '{model_type}'; supported: {SUPPORTED}")


def check_config(config) -> None:
    """Refuse the configurations the MLA runtime cannot express."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    if layer_types and len(set(layer_types)) > 1:
        raise UserError(
            "mixed sliding/full attention layers are not supported yet; "
            "set use_sliding_window=false in config.json if the model was trained without it"
        )
    if sliding is not None and layer_types and layer_types[0] != "sliding_attention":
        raise UserError("sliding_window is set but no layer uses it; clear sliding_window in config.json")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UserError("partial rotary embeddings are not supported yet")
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    if n_h % n_kv:
        raise UserError(f"num_attention_heads ({n_h}) is not a multiple of num_key_value_heads ({n_kv})")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config) -> int | None:
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types and layer_types[0] == "sliding_attention":
        return config.sliding_window
    if not layer_types:
        return getattr(config, "sliding_window", None)
    return None

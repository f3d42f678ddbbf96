"""Dtype names: the one table every flag, config file and checkpoint reader goes through.

Weights are float32, bfloat16 or float16 (``fp32``/``f32``, ``bf16``, ``fp16``/``f16`` are accepted too);
a KV *cache* may also be counted at 8 bits (``fp8``, ``int8``) in the size reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a dtype object is needed, so the CLI starts without it
    import torch

#: every accepted spelling -> the canonical torch name
WEIGHT_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "f16": "float16"}
#: bytes per cached value, by spelling (weights' spellings plus the 8-bit cache formats)
CACHE_BYTES = {**{k: {"float32": 4, "bfloat16": 2, "float16": 2}[v] for k, v in WEIGHT_NAMES.items()},
               "fp8": 1, "int8": 1}


def canonical(name: str, flag: str = "--dtype", auto: bool = False) -> str:
    """``bf16`` -> ``bfloat16``; ``auto`` passes through where allowed; a one-line error for anything else."""
    key = str(name).replace("torch.", "").lower()
    if auto and key == "auto":
        return "auto"
    if key not in WEIGHT_NAMES:
        choices = (["auto"] if auto else []) + sorted(set(WEIGHT_NAMES.values()))
        raise UserError(f"{flag} must be one of {', '.join(choices)} (or bf16, fp16, fp32), got '{name}'")
    return WEIGHT_NAMES[key]


def weight_dtype(name: str, flag: str = "--dtype") -> "torch.dtype":
    import torch

    return getattr(torch, canonical(name, flag))


def cache_bytes(name: str, flag: str = "--dtype") -> int:
    key = str(name).lower()
    if key not in CACHE_BYTES:
        raise UserError(f"{flag} must be one of {', '.join(CACHE_BYTES)}, got '{name}'")
    return CACHE_BYTES[key]


def saved_dtype(config: dict) -> "torch.dtype":
    """The dtype a ``config.json`` says its weights are stored in (``dtype`` or the older ``torch_dtype``;
    float32 when it says none)."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype")
    key = str(name).replace("torch.", "").lower() if name else None
    return getattr(torch, WEIGHT_NAMES[key]) if key in WEIGHT_NAMES else torch.float32

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


def resolve_precision(precision: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``bf16`` on CUDA or on a CPU that multiplies bf16 natively (AMX tiles or AVX-512 BF16),
    else ``fp32``."""
    if precision != "auto":
        return precision
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "bf16" if cuda or cpu_has_bf16_matmul() else "fp32"


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles (recent Xeons) or the AVX-512 BF16
    dot products (AMD Zen 4 and later, Cooper Lake), which oneDNN's bf16 matmul uses. On this project's
    2-core EPYC (AVX-512 BF16, no AMX) a [20, 896] x [896, 4864] product took 2.4 ms in bf16 against 7.8 ms
    in float32 (MKL), docs/benchmarks.md §12."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        if probe is not None and probe():
            return True
    except RuntimeError:
        pass
    return "avx512_bf16" in cpu_flags()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()

"""Make DeepSeek's always-on RMSNorm an (almost) exact linear map: two ways.

**Constant channel** (the exact export, which may carry biases):

DeepSeek normalises the latent (``kv_a_layernorm``) and, with ``q_lora_rank``,
the query latent (``q_a_layernorm``). The native format has no such norm. Add
one channel whose value is a constant ``K`` (a bias, zero weights) and scale the
real channels by ``lam``: for ``n`` normalised channels

    norm([lam c; K]) * w = c / sqrt(1 + lam^2 |c|^2 / (K^2 + n eps))   (real channels)

with ``w = sqrt(K^2/n + eps) / lam``. The factor is ``1 - delta`` with
``delta <= lam^2 B^2 / (2 K^2)`` for any ``|c| <= B``. ``K`` and ``w`` are powers
of two, so storing them in bf16 or fp16 rounds nothing that scales the whole
latent; ``lam`` goes into the (per-element rounded) projection weights. The
constant channel's own output is ``K w / sqrt(K^2/n + eps)``; nothing reads it
unless the caller gives it a column (the query bias does).

**Linear regime** (the engine form, no biases): scale the latent rows by a tiny
``lam`` so that ``lam^2 |c|^2 / n`` stays far below ``eps``; then

    norm(lam c) * w = c / sqrt(1 + lam^2 |c|^2 / (n eps))    with  w = sqrt(eps) / lam,

a relative shrink of at most ``B^2 / (2 n w^2)`` for ``|c| <= B``, whatever
``eps`` is. ``w`` is a power of two; ``lam`` (around 1e-7) lives in the
projection weights, which needs float32 or bfloat16 storage there (float16's
exponent range flushes such weights to zero). The cache holds the normalised
latent, at its ordinary scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DELTA = 1e-6  # worst-case relative shrink of the latent, guaranteed by the bound B
DS_NORM_EPS = 1e-6  # transformers builds kv_a_layernorm / q_a_layernorm with the default eps


@dataclass
class ConstantChannel:
    n: int  # channels the norm sees (real + padding + the constant one)
    bound: float  # B: |c| <= B for every input
    k: float  # the constant channel's value
    w: float  # kv_a_layernorm weight of the real channels
    lam: float  # factor on the real channels' projection rows and biases
    eps: float = DS_NORM_EPS

    @property
    def delta_bound(self) -> float:
        return self.lam**2 * self.bound**2 / (2 * (self.k**2 + self.n * self.eps))

    @property
    def constant_out(self) -> float:
        """What the constant channel becomes after the norm (with weight ``w``)."""
        return self.k * self.w / math.sqrt(self.k**2 / self.n + self.eps)

    def as_dict(self) -> dict:
        return {"channels": self.n, "bound": self.bound, "K": self.k, "w": self.w, "lam": self.lam,
                "delta_bound": self.delta_bound}


@dataclass
class LinearNorm:
    n: int  # channels the norm sees
    bound: float  # B: |c| <= B for every input
    w: float  # kv_a_layernorm weight
    lam: float  # factor on the latent's projection rows
    eps: float = DS_NORM_EPS

    @property
    def delta_bound(self) -> float:
        return self.lam**2 * self.bound**2 / (2 * self.n * self.eps)

    def as_dict(self) -> dict:
        return {"channels": self.n, "bound": self.bound, "w": self.w, "lam": self.lam, "eps": self.eps,
                "delta_bound": self.delta_bound}


def linear_norm(bound: float, n: int, delta: float = DELTA, eps: float = DS_NORM_EPS) -> LinearNorm:
    """Smallest power-of-two ``w`` whose linear regime keeps the relative shrink below ``delta`` for ``|c| <= bound``."""
    bound = max(float(bound), 1e-6)
    w = pow2_at_least(bound / math.sqrt(2 * n * delta))
    return LinearNorm(n=n, bound=bound, w=w, lam=math.sqrt(eps) / w, eps=eps)


def pow2_at_least(x: float) -> float:
    return 2.0 ** math.ceil(math.log2(x)) if x > 0 else 1.0


def constant_channel(bound: float, n: int, delta: float = DELTA, eps: float = DS_NORM_EPS) -> ConstantChannel:
    """Smallest power-of-two ``w`` with ``delta_bound <= delta``, ``K`` so that ``lam`` is about 1."""
    bound = max(float(bound), 1e-6)
    w = pow2_at_least(bound / math.sqrt(2 * n * delta))
    k = 2.0 ** round(math.log2(w * math.sqrt(n)))
    lam = math.sqrt(k**2 / n + eps) / w
    return ConstantChannel(n=n, bound=bound, k=k, w=w, lam=lam, eps=eps)


def latent_bound(w_rows: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor) -> float:
    """``B`` with ``|W x + b| <= B`` for every output ``x = x_hat * g`` of an RMSNorm (``|x_hat| <= sqrt(d)``)."""
    d = norm_weight.numel()
    scaled = w_rows.double() * norm_weight.double()[None, :]
    sigma = float(torch.linalg.matrix_norm(scaled, ord=2)) if scaled.numel() else 0.0
    b = float(bias.double().norm()) if bias is not None else 0.0
    return sigma * math.sqrt(d) + b


def apply_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = DS_NORM_EPS) -> torch.Tensor:
    """DeepSeek's RMSNorm in float64 (for checks)."""
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

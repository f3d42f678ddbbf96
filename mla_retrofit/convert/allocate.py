"""Per-layer latent ranks under one global KV budget (docs/method.md §4)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class Budget:
    """Per-layer cache values ``r_l + d_R`` and how they were derived."""

    per_layer: int  # cache values per token per layer (mean, for adaptive)
    rope_dim: int
    full: int  # 2 * n_kv * h
    uniform_rank: int | None = None  # explicit --rank

    @property
    def latent_total_per_layer(self) -> int:
        return self.per_layer - self.rope_dim


def resolve_budget(n_kv: int, head_dim: int, kv_ratio: float | None = None, kv_dim: int | None = None,
                   rank: int | None = None, rope_dim: int | None = None) -> Budget:
    """Cache values per layer and RoPE dims from one budget flag (``--rank``, ``--kv-dim`` or ``--kv-ratio``,
    which defaults to 0.5)."""
    rope_dim_arg = rope_dim
    kv_ratio = 0.5 if kv_ratio is None else kv_ratio
    full = 2 * n_kv * head_dim
    max_rope = n_kv * head_dim
    if rank is not None:
        rope_dim = rope_dim_arg if rope_dim_arg is not None else min(64, head_dim)
        per_layer = rank + rope_dim
    else:
        per_layer = kv_dim if kv_dim is not None else int(round(kv_ratio * full))
        rope_dim = rope_dim_arg if rope_dim_arg is not None else default_rope_dim(per_layer, full, head_dim, max_rope)
    if rope_dim > max_rope:
        raise UserError(f"--rope-dim {rope_dim} exceeds the model's {max_rope} key dims per layer (n_kv * head_dim)")
    r_max = full - rope_dim
    if rank is not None and rank > r_max:
        raise UserError(f"--rank {rank} is above the maximum useful rank {r_max} for --rope-dim {rope_dim}")
    if per_layer > full:
        raise UserError(f"budget of {per_layer} cache values per layer exceeds the original {full}; nothing to save")
    if per_layer <= rope_dim:
        raise UserError(
            f"budget of {per_layer} cache values per layer leaves no room for a latent beside {rope_dim} RoPE dims; "
            "raise --kv-ratio/--kv-dim or lower --rope-dim"
        )
    return Budget(per_layer=per_layer, rope_dim=rope_dim, full=full, uniform_rank=rank)


def default_rope_dim(per_layer: int, full: int, head_dim: int, max_rope: int) -> int:
    """All key dims at full budget (the exact construction); else a third of the budget, at most 3/4 of a head
    and at most 64 (DeepSeek's own RoPE key width; nothing wider was measured).

    Measured on SmolLM2-135M (head_dim 64, held-out prose, docs/benchmarks.md §9): at 50% KV (192 values per
    layer) 48 RoPE dims beat 32 and 64; at 25% (96 values) 32 beats 16, 24 and 48.
    """
    if per_layer >= full:
        return max_rope
    return max(0, min(64, 2 * ((3 * head_dim // 4) // 2), 2 * (per_layer // 6)))


def adaptive_ranks(
    spectra: list[torch.Tensor], total: int, r_min: list[int], r_max: list[int],
    weights: list[float] | None = None,
) -> list[int]:
    """Spend exactly ``total`` latent dims where they remove the most estimated error.

    ``spectra[l]`` are layer ``l``'s weighted-PCA eigenvalues (descending),
    normalised by their sum so that every layer's loss is its relative
    attention reconstruction error, times ``weights[l]`` where given (the
    layer's sensitivity: end-to-end loss per unit of relative error); each unit
    of rank goes greedily to the layer whose next weighted eigenvalue is largest
    (optimal, as each layer's tail is convex).
    """
    if sum(r_min) > total:
        raise UserError(f"budget too small: the per-layer minimum ranks need {sum(r_min)} > {total} latent dims")
    if sum(r_max) < total:
        raise UserError(f"budget too large: at most {sum(r_max)} latent dims are useful, asked for {total}")
    norm = [s.clamp_min(0) / s.clamp_min(0).sum().clamp_min(1e-30) for s in spectra]
    if weights is not None:
        norm = [n * float(w) for n, w in zip(norm, weights)]
    ranks = list(r_min)
    heap = [(-_gain(norm[l], ranks[l]), l) for l in range(len(spectra)) if ranks[l] < r_max[l]]
    heapq.heapify(heap)
    for _ in range(total - sum(ranks)):
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        if ranks[l] < r_max[l]:
            heapq.heappush(heap, (-_gain(norm[l], ranks[l]), l))
    return ranks


def _gain(norm_spectrum: torch.Tensor, rank: int) -> float:
    return float(norm_spectrum[rank]) if rank < norm_spectrum.numel() else 0.0


def predicted_tail(spectrum: torch.Tensor, rank: int) -> float:
    """The relative error a rank leaves by the layer's spectrum: the share of its eigenvalues beyond ``rank``."""
    s = spectrum.clamp_min(0)
    total = float(s.sum())
    return float(s[rank:].sum()) / total if total > 0 else 0.0

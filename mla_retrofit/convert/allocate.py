"""Per-layer latent ranks under one global KV budget (DESIGN.md §3.4)."""

from __future__ import annotations

import heapq

import torch

from ..errors import UserError


def uniform_ranks(total: int, n_layers: int, r_max: list[int]) -> list[int]:
    """Equal ranks (the DeepSeek export needs them); the remainder of ``total`` is not spent."""
    r = total // n_layers
    if r > min(r_max):
        raise UserError(f"uniform rank {r} exceeds the largest useful rank {min(r_max)}; lower the budget")
    return [r] * n_layers


def adaptive_ranks(
    spectra: list[torch.Tensor], total: int, r_min: list[int], r_max: list[int]
) -> list[int]:
    """Spend exactly ``total`` latent dims where they remove the most estimated error.

    ``spectra[l]`` are layer ``l``'s weighted-PCA eigenvalues (descending),
    normalised by their sum so that every layer's loss is its relative
    attention reconstruction error; each unit of rank goes greedily to the layer
    whose next eigenvalue is largest (optimal, as each layer's tail is convex).
    """
    if sum(r_min) > total:
        raise UserError(f"budget too small: the per-layer minimum ranks need {sum(r_min)} > {total} latent dims")
    if sum(r_max) < total:
        raise UserError(f"budget too large: at most {sum(r_max)} latent dims are useful, asked for {total}")
    norm = [s.clamp_min(0) / s.clamp_min(0).sum().clamp_min(1e-30) for s in spectra]
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

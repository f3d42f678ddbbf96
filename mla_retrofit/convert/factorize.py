"""Low-rank joint K/V factorization: ``y ~ mu + A c``, ``c = B (y - mu)``, rank ``r``.

Covariance-aware (docs/method.md §3): minimise ``E[(y - y_hat)^T G (y - y_hat)]``
over activations, with a metric ``G`` (query second moment for keys,
``W_o^T W_o`` for values). The solution is PCA of ``L Cov L`` with
``L = G^{1/2}``: ``B = P^T L``, ``A = L^{-1} P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factorization:
    down: torch.Tensor  # [r, n]   c = down @ (y - mean)
    up: torch.Tensor  # [n, r]     y_hat = mean + up @ c
    mean: torch.Tensor  # [n]
    spectrum: torch.Tensor  # eigenvalues of the weighted covariance, descending (all n)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def retained(self) -> float:
        total = self.spectrum.clamp_min(0).sum()
        return float(self.spectrum[: self.rank].clamp_min(0).sum() / total) if total > 0 else 1.0


def sqrtm_psd(g: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G^{1/2}, G^{-1/2})`` of a symmetric PSD matrix, regularised by ``eps * mean eigenvalue``."""
    evals, evecs = torch.linalg.eigh(0.5 * (g + g.T))
    floor = eps * evals.clamp_min(0).mean().clamp_min(1e-30)
    evals = evals.clamp_min(0) + floor
    return (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T


def weighted_spectrum(cov: torch.Tensor, metric: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition (descending) of ``L Cov L``; returns ``(evals, evecs)``."""
    if metric is not None:
        root, _ = sqrtm_psd(metric)
        cov = root @ cov @ root
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    return evals.flip(0), evecs.flip(1)


def activation_pca(cov: torch.Tensor, mean: torch.Tensor, rank: int, metric: torch.Tensor | None = None) -> Factorization:
    """Rank-``rank`` factorization minimising the ``metric``-weighted reconstruction error on activations."""
    evals, evecs = weighted_spectrum(cov, metric)
    p = evecs[:, :rank]
    if metric is None:
        return Factorization(down=p.T.clone(), up=p.clone(), mean=mean, spectrum=evals)
    root, inv_root = sqrtm_psd(metric)
    return Factorization(down=p.T @ root, up=inv_root @ p, mean=mean, spectrum=evals)


def weight_svd(weight: torch.Tensor, rank: int) -> Factorization:
    """Baseline: the top singular directions of the weight matrix ``y = W x`` (no activation statistics)."""
    u, s, _ = torch.linalg.svd(weight, full_matrices=False)
    spectrum = torch.zeros(weight.shape[0], dtype=weight.dtype)
    spectrum[: s.numel()] = s.square()
    p = u[:, :rank]
    if p.shape[1] < rank:  # rank above the weight's rank: pad with an orthonormal complement
        q, _ = torch.linalg.qr(torch.cat([p, torch.eye(weight.shape[0], dtype=weight.dtype)], dim=1))
        p = q[:, :rank]
    return Factorization(down=p.T.clone(), up=p.clone(), mean=torch.zeros(weight.shape[0], dtype=weight.dtype), spectrum=spectrum)


def relative_error(cov: torch.Tensor, fact: Factorization, rows: slice | None = None) -> float:
    """``E||y - y_hat||^2 / E||y - mean||^2`` restricted to ``rows``, from the covariance alone."""
    n = cov.shape[0]
    resid = torch.eye(n, dtype=cov.dtype) - fact.up @ fact.down
    err = resid @ cov @ resid.T
    if rows is not None:
        err, cov = err[rows, rows], cov[rows, rows]
    total = torch.trace(cov)
    return float(torch.trace(err) / total) if total > 0 else 0.0

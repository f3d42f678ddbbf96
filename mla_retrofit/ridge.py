"""The closed-form ridge refit of a linear map from accumulated moments, shared by ``convert`` (each layer's
``o_proj`` after its factorization) and ``heal --refit`` (every layer's ``o_proj`` of a converted model)."""

from __future__ import annotations

import torch


def solve(zz: torch.Tensor, yz: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(YZ^T + lam W)(ZZ^T + lam I)^-1`` with ``lam = ridge * mean(diag(ZZ^T))``."""
    lam = ridge * float(zz.diagonal().mean())
    eye = torch.eye(zz.shape[0], dtype=zz.dtype)
    return torch.linalg.solve(zz + lam * eye, (yz + lam * weight.double()).T).T


def moment_error(weight: torch.Tensor, zz: torch.Tensor, yz: torch.Tensor, yy: float) -> float:
    """``sum ||W z - y||^2 / sum ||y||^2`` from the accumulated moments ``Z Z^T``, ``Y Z^T`` and ``sum ||y||^2``."""
    return float((yy - 2 * (weight * yz).sum() + (weight @ zz * weight).sum()) / max(yy, 1e-30))

"""The healing losses, as pure tensor functions (computed in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def imitation_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of ``mean((y - t)^2) / mean(t^2)``: each layer's error relative to its target's power."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for y, t in zip(outputs, targets):
        t = t.float()
        total = total + (y.float() - t).square().mean() / t.square().mean().clamp_min(1e-12)
    return total


def shifted(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Predictions for positions ``1..T-1``, their targets and target mask (the token *predicted* is masked)."""
    return logits[:, :-1], ids[:, 1:], mask[:, 1:]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (``mask``); 0 when the batch holds none."""
    logits, target, m = shifted(logits, ids, mask)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    m = m.reshape(-1).float()
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(teacher || model)`` per target token, in nats."""
    logits, _, m = shifted(logits, ids, mask)
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)
    m = m.float()
    return (kl * m).sum() / m.sum().clamp_min(1.0)

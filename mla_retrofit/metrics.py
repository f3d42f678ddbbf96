"""How close two models' next-token distributions are: the one definition that heal, bench and export use.

``KL(reference || model)`` in nats per position, over the whole vocabulary at temperature 1: heal
minimises it against the teacher, bench reports its mean against the original, export checks it against
the native model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_from_log_probs(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(reference || model)`` per position (``[...]``) from both models' log-probabilities ``[..., V]``."""
    return (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)


def kl_per_token(logits: torch.Tensor, reference_logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``KL(reference || model)`` per position from logits, computed in ``dtype``."""
    return kl_from_log_probs(F.log_softmax(logits.to(dtype), dim=-1), F.log_softmax(reference_logits.to(dtype), dim=-1))


def top1_agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per position: 1 where both models' most likely next token is the same."""
    return (logits.argmax(-1) == reference_logits.argmax(-1)).to(torch.float64)

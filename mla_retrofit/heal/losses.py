"""The healing losses, as pure tensor functions (computed in float32).

Distillation and next-token loss are returned as *sums* with their counts, so
that the recipe can weight every token of an optimizer step equally, whatever
the number of targets in each micro-batch and process.

:func:`distill_sums` never holds a full ``B x T x V`` float32 tensor: it takes
the final hidden states of student and teacher, applies each model's
``lm_head`` to ``chunk`` positions at a time, and recomputes that chunk's
logits in the backward pass (activation checkpointing) instead of keeping them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import kl_per_token  # noqa: F401  (KL(teacher || student) per position)
from torch.utils.checkpoint import checkpoint


def imitation_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of ``mean((y - t)^2) / mean(t^2)``: each layer's error relative to its target's power."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for y, t in zip(outputs, targets):
        t = t.float()
        total = total + (y.float() - t).square().mean() / t.square().mean().clamp_min(1e-12)
    return total


def ce_targets(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None):
    """Next-token targets per position and their mask: position ``t`` predicts ``ids[t+1]``.

    A target counts when ``mask[t+1]`` (the token predicted is a target token) and
    ``t+1`` does not start a new document (``positions[t+1] != 0``); the last
    position of a window has no target.
    """
    target = torch.zeros_like(ids)
    target[:, :-1] = ids[:, 1:]
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, :-1] = mask[:, 1:].bool()
    if positions is not None:
        keep[:, :-1] &= positions[:, 1:] != 0
    return target.long(), keep


def residual_match_sum(states: list[torch.Tensor], targets: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the mean over layers of ``|h - t|^2 / |t|^2``, each position's own relative error.

    ``states``/``targets``: every layer's output ``[B, T, d]`` for student and teacher; ``mask``: ``[B, T]``
    0/1 weights. Normalising per position keeps the few positions with very large residual norms (the first
    token of a sequence, in most models) from dominating the sum.
    """
    total = states[0].new_zeros((), dtype=torch.float32)
    for h, t in zip(states, targets):
        t = t.float()
        err = (h.float() - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
        total = total + (err * mask.float()).sum()
    return total / max(len(states), 1)


@dataclass
class LossSums:
    kl: torch.Tensor  # sum of KL(teacher || model) over the distilled positions
    ce: torch.Tensor  # sum of next-token cross-entropy over the target positions
    kl_count: torch.Tensor
    ce_count: torch.Tensor


def _chunk_sums(hidden, teacher_hidden, head_weight, head_bias, teacher_head, target, kd_mask, ce_mask,
                want_ce: bool):
    logits = F.linear(hidden, head_weight, head_bias).float()
    if teacher_hidden is None:  # next-token loss only
        kl = logits.new_zeros(())
    else:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden).float()
        kl = (kl_per_token(logits, teacher_logits) * kd_mask).sum()
    if not want_ce:
        return kl, kl.new_zeros(())
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return kl, (nll * ce_mask.reshape(-1)).sum()


def distill_sums(hidden: torch.Tensor, head: torch.nn.Linear, teacher_hidden: torch.Tensor | None,
                 teacher_head: torch.nn.Module, kd_mask: torch.Tensor, target: torch.Tensor | None = None,
                 ce_mask: torch.Tensor | None = None, chunk: int = 1024) -> LossSums:
    """KL(teacher || student) (and cross-entropy when ``ce_mask`` is given) summed over ``chunk``-token slices.

    ``hidden``/``teacher_hidden``: final hidden states ``[B, T, d]``; ``head``: the student's ``lm_head``
    (gradients flow into it and into ``hidden``); ``kd_mask``/``ce_mask``: ``[B, T]`` 0/1 weights.
    ``teacher_hidden=None``: no distillation term (next-token loss only).
    """
    B, T, _ = hidden.shape
    want_ce = ce_mask is not None
    if target is None:
        target = torch.zeros(B, T, dtype=torch.long, device=hidden.device)
    ce_mask = ce_mask if want_ce else torch.zeros(B, T, device=hidden.device)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    step = max(1, chunk // max(B, 1))  # positions per slice so that a slice holds about ``chunk`` tokens
    for s in range(0, T, step):
        teacher_slice = None if teacher_hidden is None else teacher_hidden[:, s : s + step]
        args = (hidden[:, s : s + step], teacher_slice, head.weight, head.bias, teacher_head,
                target[:, s : s + step], kd_mask[:, s : s + step].float(), ce_mask[:, s : s + step].float(), want_ce)
        if torch.is_grad_enabled() and hidden.requires_grad:
            kl, ce = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            kl, ce = _chunk_sums(*args)
        kl_total = kl_total + kl
        ce_total = ce_total + ce
    return LossSums(kl=kl_total, ce=ce_total, kl_count=kd_mask.float().sum(), ce_count=ce_mask.float().sum())

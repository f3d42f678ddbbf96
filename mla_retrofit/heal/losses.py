"""The healing losses, as pure tensor functions (computed in float32).

Distillation and next-token loss are returned as *sums* with their counts, so
that the recipe can weight every token of an optimizer step equally, whatever
the number of targets in each micro-batch and process.

:func:`distill_sums` never holds a full ``B x T x V`` float32 tensor: it takes
the final hidden states of student and teacher and applies each model's
``lm_head`` to ``chunk`` tokens at a time. Since heal never trains ``lm_head``,
the gradient of the loss with respect to the student's hidden states is known in
closed form (``(softmax(s) - softmax(t)) W`` for the KL, ``(softmax(s) -
onehot(y)) W`` for next-token loss) and is computed in the forward pass
(:class:`_FusedHeadLoss`), a few rows at a time so the float32 work stays in the
CPU's cache; the backward pass only scales it. Nothing is recomputed and no
logit is kept. On SmolLM2-135M (2 x 512 tokens, vocabulary 49,152, bf16 on this
project's 2-core CPU) a phase-2 step takes 2.82 s instead of 3.79 s (1.34x;
``benchmarks/heal_step.py``). A trainable head falls back to slicing with
activation checkpointing (the logits of a slice recomputed in the backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import kl_per_token  # noqa: F401  (KL(teacher || student) per position)
from torch.utils.checkpoint import checkpoint


def imitation_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor],
                   metrics: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over layers of ``mean((y - t)^2) / mean(t^2)``: each layer's error relative to its target's power.

    With ``metrics`` (one ``[d, d]`` factor ``L_l`` per layer, :func:`~.models.attention_fisher`), the error
    and the target are measured in that metric instead: ``mean(|(y - t) L_l|^2) / mean(|t L_l|^2)``.
    """
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for i, (y, t) in enumerate(zip(outputs, targets)):
        t = t.float()
        err = y.float() - t
        if metrics is not None:
            err, t = err @ metrics[i], t @ metrics[i]
        total = total + err.square().mean() / t.square().mean().clamp_min(1e-12)
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


#: rows of a slice whose float32 softmax work is done at once, so it stays in a CPU core's cache (8 x 49,152
#: floats, 1.5 MB); a GPU takes a slice whole
CPU_ROWS = 8


def _slice_sums(logits, teacher_logits, kd, ce, target, rows: int, want_ce: bool, need_grad: bool):
    """One slice's KL and next-token sums, and (``need_grad``) the gradients of each sum with respect to the
    logits: ``(softmax(s) - softmax(t)) * kd`` and the ``softmax(s) * ce`` part of ``(softmax(s) - onehot) * ce``.
    The float32 work is done ``rows`` rows at a time."""
    kl_sum = logits.new_zeros((), dtype=torch.float32)
    ce_sum = logits.new_zeros((), dtype=torch.float32)
    diff = torch.empty_like(logits) if need_grad and teacher_logits is not None else None
    probs = torch.empty_like(logits) if need_grad and want_ce else None
    for r in range(0, logits.shape[0], rows):
        s = logits[r : r + rows].float()
        s -= torch.logsumexp(s, -1, keepdim=True)  # the student's log-probabilities
        if want_ce:
            nll = -s.gather(-1, target[r : r + rows, None]).squeeze(-1)
            ce_sum += (nll * ce[r : r + rows]).sum()
        if teacher_logits is not None:
            t = teacher_logits[r : r + rows].float()
            t -= torch.logsumexp(t, -1, keepdim=True)
            p = t.exp()
            kl_sum += (torch.linalg.vecdot(p, t - s) * kd[r : r + rows]).sum()
        if need_grad:
            s.exp_()  # the student's probabilities
            if diff is not None:
                diff[r : r + rows] = (s - p) * kd[r : r + rows, None]
            if probs is not None:
                probs[r : r + rows] = s * ce[r : r + rows, None]
    return kl_sum, ce_sum, diff, probs


class _FusedHeadLoss(torch.autograd.Function):
    """Sums of KL(teacher || student) and next-token loss over ``[N, d]`` hidden states, with the gradient
    with respect to ``hidden`` computed in the forward pass (the heads are constants)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, kd_mask, target, ce_mask,
                want_ce: bool, chunk: int):
        device = hidden.device.type
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_grad = ctx.needs_input_grad[0]
        rows = CPU_ROWS if device == "cpu" else chunk
        w, b = weight.to(mm), None if bias is None else bias.to(mm)
        distill = teacher_hidden is not None
        tw = teacher_weight.to(mm) if distill else None
        tb = teacher_bias.to(mm) if distill and teacher_bias is not None else None
        kl_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        grad_kl = hidden.new_zeros(hidden.shape, dtype=torch.float32) if need_grad else None
        grad_ce = torch.zeros_like(grad_kl) if need_grad and want_ce else None
        with torch.autocast(device, enabled=False):
            for m in range(0, hidden.shape[0], chunk):
                part = slice(m, m + chunk)
                logits = F.linear(hidden[part].detach().to(mm), w, b)
                teacher_logits = F.linear(teacher_hidden[part].to(mm), tw, tb) if distill else None
                ce = ce_mask[part].float()
                kl_sum, ce_sum, diff, probs = _slice_sums(logits, teacher_logits, kd_mask[part].float(), ce,
                                                          target[part], rows, want_ce, need_grad)
                kl_total += kl_sum
                ce_total += ce_sum
                if diff is not None:
                    grad_kl[part] = diff @ w
                if probs is not None:
                    grad_ce[part] = probs @ w - weight[target[part]].float() * ce[:, None]
        ctx.save_for_backward(grad_kl, grad_ce)
        ctx.hidden_dtype = hidden.dtype
        return kl_total, ce_total

    @staticmethod
    def backward(ctx, d_kl, d_ce):
        grad_kl, grad_ce = ctx.saved_tensors
        grad = None
        if grad_kl is not None:
            grad = grad_kl * d_kl
            if grad_ce is not None:
                grad = grad + grad_ce * d_ce
            grad = grad.to(ctx.hidden_dtype)
        return (grad,) + (None,) * 10


def distill_sums(hidden: torch.Tensor, head: torch.nn.Linear, teacher_hidden: torch.Tensor | None,
                 teacher_head: torch.nn.Module, kd_mask: torch.Tensor, target: torch.Tensor | None = None,
                 ce_mask: torch.Tensor | None = None, chunk: int = 1024, fused: bool | None = None) -> LossSums:
    """KL(teacher || student) (and cross-entropy when ``ce_mask`` is given) summed over ``chunk``-token slices.

    ``hidden``/``teacher_hidden``: final hidden states ``[B, T, d]``; ``head``: the student's ``lm_head``
    (gradients flow into it and into ``hidden``); ``kd_mask``/``ce_mask``: ``[B, T]`` 0/1 weights.
    ``teacher_hidden=None``: no distillation term (next-token loss only). ``fused``: the closed-form gradient
    (:class:`_FusedHeadLoss`); None uses it whenever the head is frozen (False: always slice and checkpoint).
    """
    B, T, _ = hidden.shape
    want_ce = ce_mask is not None
    if target is None:
        target = torch.zeros(B, T, dtype=torch.long, device=hidden.device)
    ce_mask = ce_mask if want_ce else torch.zeros(B, T, device=hidden.device)
    frozen = not (head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad))
    if fused is None:
        fused = frozen
    if fused and not frozen:
        raise ValueError("the fused loss needs a frozen head (its gradient is not computed)")
    if fused:
        d = hidden.shape[-1]
        flat_teacher = None if teacher_hidden is None else teacher_hidden.reshape(B * T, -1)
        kl_total, ce_total = _FusedHeadLoss.apply(
            hidden.reshape(B * T, d), head.weight, head.bias, flat_teacher, teacher_head.weight,
            getattr(teacher_head, "bias", None), kd_mask.reshape(-1), target.reshape(-1), ce_mask.reshape(-1),
            want_ce, chunk)
        return LossSums(kl=kl_total, ce=ce_total, kl_count=kd_mask.float().sum(), ce_count=ce_mask.float().sum())
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

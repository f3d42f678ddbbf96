"""Closed-form refit of every attention output projection toward the teacher's residual stream.

Before any gradient step: run the teacher once over a few training windows and
record, per layer, its residual stream after attention ``r_t``. Then walk the
student layer by layer on its *own* propagated inputs ``h_s``: record the
input of its ``o_proj`` (``z``, the concatenated head outputs) and solve, by
ridge regression toward the current weights,

    W' = argmin_W  sum ||W z + b - (r_t - h_s)||^2 + lam ||W - W_o||^2
       = (Y Z^T + lam W_o) (Z Z^T + lam I)^-1,   Y = r_t - h_s - b

so that the student's residual after attention lands on the teacher's, which
also corrects the drift that earlier layers left. ``lam`` is ``ridge`` times
the mean diagonal of ``Z Z^T``. The layer then runs again with ``W'`` to give
the next layer's input. Statistics are accumulated in float64; memory is the
teacher's residual streams for the refit windows (``L x N x T x d``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ridge import solve
from .models import residual_scale


class _Record:
    def __init__(self):
        self.value = None

    def __call__(self, _module, args, kwargs, output=None):
        if output is None:  # forward pre-hook: the module's input
            self.value = args[0] if args else kwargs["hidden_states"]
        else:
            self.value = output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def teacher_post_attention(teacher, ids: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the teacher's residual stream right after its attention (``h + attn(norm(h))``)."""
    layers = teacher.model.layers
    inputs, outputs, handles = [], [], []
    for layer in layers:
        rin, rout = _Record(), _Record()
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, r=rin: r(m, a, k), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, k, o, r=rout: r(m, a, k, o),
                                                             with_kwargs=True))
        inputs.append(rin)
        outputs.append(rout)
    try:
        teacher.model(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(i.value + o.value).float() for i, o in zip(inputs, outputs)]


@torch.no_grad()
def refit_output_projections(student, teacher, ids: torch.Tensor, positions: torch.Tensor, attention_mask,
                             ridge: float = 1e-2, progress=None) -> list[float]:
    """Refit every layer's ``self_attn.o_proj`` in place; returns each layer's relative residual error after."""
    scale = residual_scale(student, teacher)  # the engine form's residual stream is the teacher's times s
    targets = [t * scale for t in teacher_post_attention(teacher, ids, positions)]
    model = student.model
    h = model.embed_tokens(ids)
    position_embeddings = model.rotary_emb(h, positions)
    errors = []
    for i, layer in enumerate(model.layers):
        o_proj: nn.Linear = layer.self_attn.o_proj
        rec = _Record()
        handle = o_proj.register_forward_pre_hook(lambda m, a, k: rec(m, a, k), with_kwargs=True)  # noqa: B023
        try:
            layer(hidden_states=h, attention_mask=attention_mask, position_embeddings=position_embeddings,
                  position_ids=positions)
        finally:
            handle.remove()
        z = rec.value.reshape(-1, rec.value.shape[-1]).double()
        y = (targets[i] - h.float()).reshape(-1, h.shape[-1]).double()
        if o_proj.bias is not None:
            y = y - o_proj.bias.double()
        weight = solve(z.T @ z, y.T @ z, o_proj.weight, ridge)
        o_proj.weight.copy_(weight.to(o_proj.weight.dtype))
        h = layer(hidden_states=h, attention_mask=attention_mask, position_embeddings=position_embeddings,
                  position_ids=positions)
        h = h[0] if isinstance(h, tuple) else h
        fit = (z @ weight.T - y).square().sum() / y.square().sum().clamp_min(1e-30)
        errors.append(float(fit))
        if progress:
            progress(i + 1, len(model.layers))
    return errors

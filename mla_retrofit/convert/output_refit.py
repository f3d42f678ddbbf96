"""Each converted layer's ``o_proj`` refit in closed form so the converted residual stream after its attention
lands on the source's (``convert --refit-output``)."""

from __future__ import annotations

import torch

from ..ridge import moment_error, solve


@torch.no_grad()
def refit_output(mla_layer, hidden, target, cos, sin, batch_size: int, ridge: float):
    """Refit ``mla_layer``'s ``o_proj`` so the converted residual stream after attention lands on the source's.

    ``hidden`` is the converted model's residual stream entering this layer (after the MLA layers so far),
    ``target`` the source's residual stream after this layer's attention (kept from pass A). With ``z`` the
    MLA heads' concatenated outputs on ``hidden`` and ``y = target - hidden - b`` (``b`` the MLA ``o_proj``
    bias), the new weight is the ridge solution toward the source's ``W_o``:
    ``(Y Z^T + lam W_o)(Z Z^T + lam I)^-1``, ``lam`` = ``refit_ridge`` x the mean diagonal of ``Z Z^T``
    (:func:`mla_retrofit.ridge.solve`, the same solve as ``heal --refit``). It corrects, in the output space, what the
    latent loses and the drift the layers before it left.

    The layer runs once: returns the converted stream after this layer (with the refit ``o_proj``) and the
    relative error of ``y`` on the calibration windows before and after the refit.
    """
    o = mla_layer.self_attn.o_proj
    got = {}
    hook = o.register_forward_pre_hook(lambda _m, args: got.__setitem__("z", args[0]))
    n_in, n_out = o.in_features, o.out_features
    zz = torch.zeros(n_in, n_in, dtype=torch.float64)
    yz = torch.zeros(n_out, n_in, dtype=torch.float64)
    yy, zs = 0.0, []
    bs = batch_size
    try:
        for s in range(0, hidden.shape[0], bs):
            h = hidden[s : s + bs]
            c, sn = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
            mla_layer.self_attn(mla_layer.input_layernorm(h), position_embeddings=(c, sn))
            zs.append(got["z"])
            y = target[s : s + bs] - h
            if o.bias is not None:
                y = y - o.bias
            z, y = got["z"].reshape(-1, n_in), y.reshape(-1, n_out)
            zz += (z.T @ z).double()
            yz += (y.T @ z).double()
            yy += float(y.double().square().sum())
    finally:
        hook.remove()
    w0 = o.weight.double()
    w = solve(zz, yz, w0, ridge)
    before, after = moment_error(w0, zz, yz, yy), moment_error(w, zz, yz, yy)
    o.weight.copy_(w.to(o.weight.dtype))
    # the converted layer's output from the heads' outputs already computed (MLARetrofitDecoderLayer.forward)
    out = torch.empty_like(hidden)
    for j, s in enumerate(range(0, hidden.shape[0], bs)):
        r = hidden[s : s + bs] + o(zs[j])
        out[s : s + bs] = r + mla_layer.mlp(mla_layer.post_attention_layernorm(r))
    return out, before, after

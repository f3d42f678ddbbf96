"""How much the model's output distribution cares about each layer's attention output (docs/method.md §4).

For a small error ``delta`` in layer ``l``'s attention output (after ``o_proj``), the KL from the original's
next-token distribution to the perturbed one is, to second order, ``1/2 delta^T F delta`` per position, with
``F`` the Fisher information of the output distribution with respect to that activation. We estimate it with
labels sampled from the original model itself (``E_y[g g^T]``, ``g = d log p(y) / d o_l``), one forward and one
backward of the source model on a few calibration windows, streamed one layer at a time (each layer's input is
kept, the layer re-run with gradients on the way back), so no more than one layer's weights are in memory.

Assuming the conversion error is shaped like the activation itself (a fraction of it, in directions drawn
like the activation's own), ``E[(g^T delta)^2] = eps * g^T Sigma g`` with ``eps`` the relative error and
``Sigma = E[o o^T]``. So

    s_l = 1/2 * tr(F_l Sigma_l)        (nats per token per unit of relative attention-output error)

and ``s_l * eps_l`` predicts layer ``l``'s share of the end-to-end KL. The rank allocation weighs each layer's
relative spectral tail by ``s_l ** p`` (``--sensitivity-power``).
"""

from __future__ import annotations

import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def layer_sensitivities(conv, ids: torch.Tensor, seed: int = 0, chunk: int = 256) -> list[float]:
    """``s_l`` for every layer of the :class:`~.pipeline.Converter`'s source, on the windows ``ids`` ``[B, T]``."""
    with torch.enable_grad():  # also when the caller converts inside ``torch.no_grad()``
        return _sensitivities(conv, ids, seed, chunk)


def _sensitivities(conv, ids: torch.Tensor, seed: int, chunk: int) -> list[float]:
    c = conv.config
    cos, sin = conv._rope(ids.shape[1])
    w = conv.source.weights
    head = (w.get("model.embed_tokens.weight") if getattr(c, "tie_word_embeddings", False)
            else w.get("lm_head.weight")).float()
    norm_w = w.get("model.norm.weight").float()
    eps = float(c.rms_norm_eps)
    bs = conv.cfg.batch_size
    pos_ids = torch.arange(ids.shape[1]).unsqueeze(0)

    # forward, keeping each layer's input
    inputs = []
    hidden = conv._embed(ids)
    with torch.no_grad():
        for i in range(conv.n_layers):
            inputs.append(hidden)
            hidden = conv._run_layer(conv._layer(i), hidden, cos, sin, None)

    # d sum_positions log p(y) / d hidden, with y drawn from the original's own next-token distribution
    gen = torch.Generator().manual_seed(seed)
    flat = hidden.reshape(-1, hidden.shape[-1])
    grad = torch.empty_like(flat)
    for s in range(0, flat.shape[0], chunk):
        x = flat[s : s + chunk].detach().requires_grad_(True)
        logp = torch.log_softmax(_rms_norm(x, norm_w, eps) @ head.T, dim=-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        logp.gather(-1, y).sum().backward()
        grad[s : s + chunk] = x.grad
    grad = grad.view_as(hidden)
    del head, flat, hidden

    # backward, one layer at a time: the gradient at the attention output and the activation's second moment
    sens = [0.0] * conv.n_layers
    for i in reversed(range(conv.n_layers)):
        layer = conv._layer(i).requires_grad_(False)  # gradients for its activations only, not its weights
        captured = {}

        def keep(_mod, _args, out):
            out.retain_grad()
            captured["o"] = out  # noqa: B023  (the hook is removed within this iteration)

        handle = layer.self_attn.o_proj.register_forward_hook(keep)
        grad_in = torch.empty_like(grad)
        d = grad.shape[-1]
        gg = torch.zeros(d, d, dtype=torch.float64)
        oo = torch.zeros(d, d, dtype=torch.float64)
        n_tok = 0
        try:
            for s in range(0, ids.shape[0], bs):
                x = inputs[i][s : s + bs].detach().requires_grad_(True)
                cs, sn = cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1)
                out = layer(x, attention_mask=None, position_embeddings=(cs, sn), position_ids=pos_ids)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(grad[s : s + bs])
                g = captured["o"].grad.reshape(-1, d).double()
                o = captured["o"].detach().reshape(-1, d).double()
                gg += g.T @ g
                oo += o.T @ o
                n_tok += o.shape[0]
                grad_in[s : s + bs] = x.grad
        finally:
            handle.remove()
        sens[i] = float(0.5 * (gg / n_tok * (oo / n_tok)).sum())
        grad = grad_in
        inputs[i] = None
        conv.progress("sensitivity", conv.n_layers - i, conv.n_layers)
    return sens

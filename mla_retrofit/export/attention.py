"""One layer's native MLA attention rewritten as DeepSeek-V3 attention tensors (float64 maths, no I/O).

Native (per head ``i`` of KV group ``g``), scores scaled by ``h^-0.5``::

    [c; k_R] = W_a x + b_a                  q_i = W_q,i x (+ b_q,i)
    score    = q_i . (K_up,g c) + RoPE(Q_R,g q_i) . RoPE(k_R)       v_i = V_up,g c

DeepSeek-V3, scores scaled by ``s = (qk_nope + qk_rope)^-0.5`` (yarn-adjusted)::

    [c'; k'] = W x + b,   c'' = RMSNorm(c') * w
    q_i      = [q_nope,i ; q_rot,i]        k_i = [KB_k,i c'' ; RoPE(k')]    v_i = KB_v,i c''

The map: ``qk_nope_head_dim = h`` with ``q_nope,i = alpha q_i`` (``alpha = h^-0.5 / s``)
and ``KB_k,i = K_up,g`` (the per-group up-projection copied to every head of the
group); ``q_rot,i = alpha_R P Q_R,g q_i`` and ``k' = P k_R`` with ``P`` placing
the kept pairs in DeepSeek's table slots (``alpha_R`` also corrects the two
tables' cos/sin factors); ``c'' = c`` up to ``delta`` through the constant
channel of :mod:`latent_norm`. A query bias needs a constant somewhere before
``q_b_proj``: the ``q_lora`` path carries it through its own constant channel.

The engine form (``with_bias=False``) has no bias anywhere: the latent norm runs
in its linear regime instead (:func:`latent_norm.linear_norm`), and whatever
bias the native layer has is left out (exact when the native layer has none:
a bias-free conversion, ``convert --no-centre``, of a bias-free family).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latent_norm import ConstantChannel, LinearNorm, constant_channel, latent_bound, linear_norm
from .rope_table import rope_rows, scatter_rows


@dataclass
class LayerGeometry:
    """Shapes shared by every layer of one export."""

    n_heads: int
    kv_groups: int
    head_dim: int
    hidden: int
    kv_lora_rank: int  # r' (real + padding + constant channel)
    rope_pairs: int  # d_R' / 2
    interleave: bool
    alpha: float  # nope query factor
    alpha_rope: float  # rope query factor
    q_lora_rank: int | None = None

    @property
    def rope_dim(self) -> int:
        return 2 * self.rope_pairs


@dataclass
class NativeAttention:
    """The native tensors of one layer's attention (float64)."""

    q_w: torch.Tensor  # [H*h, d]
    q_b: torch.Tensor | None
    kv_a_w: torch.Tensor  # [r + d_R, d]
    kv_a_b: torch.Tensor | None
    q_rope: torch.Tensor  # [G, d_R, h]
    k_up: torch.Tensor  # [G*h, r]
    v_up: torch.Tensor  # [G*h, r]
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    input_norm: torch.Tensor  # input_layernorm weight (bounds |x|)

    @property
    def rank(self) -> int:
        return self.k_up.shape[1]

    @property
    def rope_dim(self) -> int:
        return self.q_rope.shape[1]


def full_query(nat: NativeAttention, geo: LayerGeometry, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeepSeek's per-head ``[q_nope ; q_rot]`` weight ``[H*(h + d_R'), d]`` (and bias), scale folded in."""
    n_h, h, rep = geo.n_heads, geo.head_dim, geo.n_heads // geo.kv_groups
    rows = rope_rows(slots, geo.rope_pairs, geo.interleave)
    q_rope = nat.q_rope.repeat_interleave(rep, dim=0)  # [H, d_R, h]

    def per_head(q: torch.Tensor) -> torch.Tensor:  # q: [H, h, k] -> [H, h + d_R', k]
        rot = torch.einsum("nrh,nhk->nrk", q_rope, q) * geo.alpha_rope
        rot = torch.stack([scatter_rows(rot[i], rows, geo.rope_dim) for i in range(n_h)])
        return torch.cat([q * geo.alpha, rot], dim=1)

    w = per_head(nat.q_w.view(n_h, h, -1)).reshape(n_h * (h + geo.rope_dim), -1)
    b = None
    if nat.q_b is not None:
        b = per_head(nat.q_b.view(n_h, h, 1)).reshape(-1)
    return w, b


def kv_tensors(nat: NativeAttention, geo: LayerGeometry, slots: list[int], with_bias: bool):
    """``kv_a_proj_with_mqa`` weight/bias, ``kv_a_layernorm`` weight, ``kv_b_proj`` weight, and the channel used."""
    r, r_out, d_r = nat.rank, geo.kv_lora_rank, geo.rope_dim
    w_c, w_r = nat.kv_a_w[:r], nat.kv_a_w[r:]
    b_a = nat.kv_a_b if nat.kv_a_b is not None else torch.zeros(nat.kv_a_w.shape[0], dtype=torch.float64)
    b_c, b_r = b_a[:r], b_a[r:]
    rows = rope_rows(slots, geo.rope_pairs, geo.interleave)
    a_w = torch.zeros(r_out + d_r, nat.kv_a_w.shape[1], dtype=torch.float64)
    a_b = torch.zeros(r_out + d_r, dtype=torch.float64)
    norm_w = torch.zeros(r_out, dtype=torch.float64)
    channel: ConstantChannel | LinearNorm
    if with_bias:
        channel = constant_channel(latent_bound(w_c, b_c, nat.input_norm), n=r_out)
        a_w[:r], a_b[:r] = channel.lam * w_c, channel.lam * b_c
        a_b[r_out - 1] = channel.k
        norm_w[: r_out - 1] = channel.w  # the constant channel keeps weight 0: the cache stores 0 there
    else:
        channel = linear_norm(latent_bound(w_c, None, nat.input_norm), n=r_out)
        a_w[:r] = channel.lam * w_c
        norm_w[:] = channel.w
    a_w[r_out:] = scatter_rows(w_r, rows, d_r)
    a_b[r_out:] = scatter_rows(b_r, rows, d_r)
    b_w = kv_b_weight(nat, geo)
    return a_w, (a_b if with_bias else None), norm_w, b_w, channel


def kv_b_weight(nat: NativeAttention, geo: LayerGeometry) -> torch.Tensor:
    """``[H*(h + h), r']``: head ``i`` gets its group's ``K_up`` then ``V_up``; padding/constant columns zero."""
    n_h, g, h, r = geo.n_heads, geo.kv_groups, geo.head_dim, nat.rank
    rep = n_h // g
    k_up = nat.k_up.view(g, h, r).repeat_interleave(rep, dim=0)
    v_up = nat.v_up.view(g, h, r).repeat_interleave(rep, dim=0)
    out = torch.zeros(n_h, 2 * h, geo.kv_lora_rank, dtype=torch.float64)
    out[:, :h, :r] = k_up
    out[:, h:, :r] = v_up
    return out.reshape(n_h * 2 * h, geo.kv_lora_rank)


def q_lora_tensors(w_q: torch.Tensor, b_q: torch.Tensor, input_norm: torch.Tensor, rank: int):
    """Carry a query bias through ``q_a_proj -> q_a_layernorm -> q_b_proj`` with a constant channel.

    ``rank - 1`` is the hidden size (``q_a_proj`` passes ``x``) or the query size
    (``q_a_proj`` is the query itself), whichever is smaller.
    """
    rows, d = w_q.shape
    n = rank
    if n - 1 == d:  # q_a passes x through; q_b = [W_q | b_q / const]
        bound = latent_bound(torch.eye(d, dtype=torch.float64), None, input_norm)
        ch = constant_channel(bound, n=n)
        a_w = torch.cat([ch.lam * torch.eye(d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)])
        a_b = torch.zeros(n, dtype=torch.float64)
        a_b[-1] = ch.k
        b_w = torch.cat([w_q, (b_q / ch.constant_out)[:, None]], dim=1)
    else:  # q_a is the query (with its bias); q_b = identity
        ch = constant_channel(latent_bound(w_q, b_q, input_norm), n=n)
        a_w = torch.cat([ch.lam * w_q, torch.zeros(1, d, dtype=torch.float64)])
        a_b = torch.cat([ch.lam * b_q, torch.tensor([ch.k], dtype=torch.float64)])
        b_w = torch.cat([torch.eye(rows, dtype=torch.float64), torch.zeros(rows, 1, dtype=torch.float64)], dim=1)
    norm_w = torch.full((n,), ch.w, dtype=torch.float64)
    if n - 1 != d:
        norm_w[-1] = 0.0
    return a_w, a_b, norm_w, b_w, ch


def attention_tensors(nat: NativeAttention, geo: LayerGeometry, slots: list[int], with_bias: bool):
    """``{name: tensor}`` of ``DeepseekV3Attention`` for one layer, plus the constant channels used."""
    out: dict[str, torch.Tensor] = {}
    channels: dict[str, ConstantChannel | LinearNorm] = {}
    w_q, b_q = full_query(nat, geo, slots)
    if geo.q_lora_rank is not None:
        a_w, a_b, n_w, b_w, ch = q_lora_tensors(w_q, b_q, nat.input_norm, geo.q_lora_rank)
        out.update({"q_a_proj.weight": a_w, "q_a_proj.bias": a_b, "q_a_layernorm.weight": n_w, "q_b_proj.weight": b_w})
        channels["q"] = ch
    else:
        out["q_proj.weight"] = w_q
    a_w, a_b, n_w, b_w, ch = kv_tensors(nat, geo, slots, with_bias)
    out.update({"kv_a_proj_with_mqa.weight": a_w, "kv_a_layernorm.weight": n_w, "kv_b_proj.weight": b_w,
                "o_proj.weight": nat.o_w})
    if with_bias:
        out["kv_a_proj_with_mqa.bias"] = a_b
        out["o_proj.bias"] = nat.o_b if nat.o_b is not None else torch.zeros(nat.o_w.shape[0], dtype=torch.float64)
    channels["kv"] = ch
    return out, channels

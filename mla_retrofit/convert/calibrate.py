"""Per-layer calibration statistics, accumulated in float64 (docs/method.md §1).

For one decoder layer and its input hidden states this collects: the mean and
second moment of ``u = [k ; v]`` (keys after ``k_norm``, before RoPE), the
query second moment summed per KV group, and a few whole sequences of
queries, keys, attention probabilities and attention inputs for the
measurements that need them (RoPE drop cost, reconstruction errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LayerStats:
    n_kv: int
    head_dim: int
    n_tokens: int = 0
    u_sum: torch.Tensor | None = None
    u_m2: torch.Tensor | None = None
    q_m2: torch.Tensor | None = None  # [n_kv, h, h], summed over the heads of each group
    samples: list = field(default_factory=list)  # (q [H,T,h], k [n_kv,T,h], attn [H,T,T])
    x_eval: list = field(default_factory=list)  # attention inputs [T, d] of the sampled sequences
    # Attention-averaged u (u~_i,m = sum_n a_imn u_n) per KV group: what the values reach the output as.
    att_sum: torch.Tensor | None = None  # [n_kv, 2n]
    att_m2: torch.Tensor | None = None  # [n_kv, 2n, 2n]
    att_count: int = 0  # (query, head) pairs per group
    att_seqs: int = 0

    def mean(self) -> torch.Tensor:
        return self.u_sum / self.n_tokens

    def m2(self) -> torch.Tensor:
        return self.u_m2 / self.n_tokens

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        return self.m2() - torch.outer(mu, mu)

    def key_m2(self) -> torch.Tensor:
        n = self.n_kv * self.head_dim
        return self.m2()[:n, :n]

    def query_m2(self) -> torch.Tensor:
        return self.q_m2 / self.n_tokens

    def attended_cov(self, centre: torch.Tensor | None = None) -> torch.Tensor | None:
        """``E[(u~ - mu)(u~ - mu)^T]`` per group (``[n_kv, 2n, 2n]``), ``mu`` the token mean unless ``centre`` is given."""
        if self.att_m2 is None or self.att_count == 0:
            return None
        mu, m1 = (self.mean() if centre is None else centre), self.att_sum / self.att_count
        m2 = self.att_m2 / self.att_count
        return m2 - mu[:, None] * m1[:, None, :] - m1[:, :, None] * mu + torch.outer(mu, mu)


def attention_projections(attn, x: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, linear=None):
    """Queries ``[B,T,H,h]``, keys and values ``[B,T,n_kv,h]`` of a transformers attention module, before RoPE.

    ``linear``: the outputs of its ``q_proj``, ``k_proj`` and ``v_proj`` on ``x`` when a forward pass already
    computed them (the same numbers, not computed twice)."""
    b, t, _ = x.shape
    q, k, v = linear if linear is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    q = q.view(b, t, n_heads, head_dim)
    k = k.view(b, t, n_kv, head_dim)
    v = v.view(b, t, n_kv, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def accumulate(
    stats: LayerStats,
    attn,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    max_samples: int,
    sample_len: int,
    sliding_window: int | None = None,
    max_att_seqs: int = 0,
    att_stride: int = 4,
    linear=None,
) -> None:
    """Add one batch of attention inputs ``x`` (``[B, T, d]``) to ``stats`` (``linear``: see
    :func:`attention_projections`)."""
    n_kv, h = stats.n_kv, stats.head_dim
    q, k, v = attention_projections(attn, x, n_heads, n_kv, h, linear)
    b, t = x.shape[:2]
    u = torch.cat([k.reshape(b * t, -1), v.reshape(b * t, -1)], dim=-1).double()
    qd = q.double().view(b * t, n_kv, n_heads // n_kv, h)
    if stats.u_sum is None:
        stats.u_sum = torch.zeros(u.shape[1], dtype=torch.float64)
        stats.u_m2 = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64)
        stats.q_m2 = torch.zeros(n_kv, h, h, dtype=torch.float64)
    stats.u_sum += u.sum(0)
    stats.u_m2 += u.T @ u
    stats.q_m2 += torch.einsum("ngid,ngie->gde", qd, qd)
    stats.n_tokens += b * t
    group = n_heads // n_kv
    for i in range(b):
        if stats.att_seqs >= max_att_seqs:
            break
        probs = attention_probs(q[i], k[i], cos[0], sin[0], group, sliding_window)  # [H, T, T]
        probs = probs[:, att_stride - 1 :: att_stride]  # every att_stride-th query: the statistics, at a fraction of the cost
        ut = torch.matmul(probs, u.view(b, t, -1)[i].float())  # [H, T', 2n]
        if stats.att_m2 is None:
            stats.att_m2 = torch.zeros(n_kv, u.shape[1], u.shape[1], dtype=torch.float64)
            stats.att_sum = torch.zeros(n_kv, u.shape[1], dtype=torch.float64)
        ut = ut.reshape(n_kv, -1, ut.shape[-1]).double()
        stats.att_m2 += ut.transpose(1, 2) @ ut
        stats.att_sum += ut.sum(1)
        stats.att_count += ut.shape[1]
        stats.att_seqs += 1
    for i in range(b):
        if len(stats.samples) >= max_samples:
            break
        s = min(sample_len, t)
        probs = attention_probs(q[i, :s], k[i, :s], cos[0, :s], sin[0, :s], group, sliding_window)
        stats.samples.append((q[i, :s].transpose(0, 1).float(), k[i, :s].transpose(0, 1).float(), probs))
        stats.x_eval.append(x[i, :s].detach().float())


def attention_probs(q, k, cos, sin, group: int, sliding_window: int | None = None) -> torch.Tensor:
    """The source model's attention probabilities ``[H, T, T]`` from unrotated ``q [T,H,h]``, ``k [T,n_kv,h]``."""
    s, h = q.shape[0], q.shape[-1]
    qi, ki = q.transpose(0, 1).float(), k.transpose(0, 1).float()
    c, sn = cos.float(), sin.float()
    qr, kr = rope_rotate(qi, c, sn), rope_rotate(ki, c, sn).repeat_interleave(group, dim=0)
    scores = qr @ kr.transpose(-1, -2) * h**-0.5
    mask = torch.ones(s, s, dtype=torch.bool).tril()  # one unbatched sequence in float64 maths, not a model forward
    if sliding_window is not None:
        mask &= ~torch.ones(s, s, dtype=torch.bool).tril(-sliding_window)
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

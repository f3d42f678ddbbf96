"""Per-layer calibration statistics, accumulated in float64 (DESIGN.md §3.1).

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


def attention_projections(attn, x: torch.Tensor, n_heads: int, n_kv: int, head_dim: int):
    """Queries ``[B,T,H,h]``, keys and values ``[B,T,n_kv,h]`` of a transformers attention module, before RoPE."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, n_heads, head_dim)
    k = attn.k_proj(x).view(b, t, n_kv, head_dim)
    v = attn.v_proj(x).view(b, t, n_kv, head_dim)
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
) -> None:
    """Add one batch of attention inputs ``x`` (``[B, T, d]``) to ``stats``."""
    n_kv, h = stats.n_kv, stats.head_dim
    q, k, v = attention_projections(attn, x, n_heads, n_kv, h)
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
    for i in range(b):
        if len(stats.samples) >= max_samples:
            break
        s = min(sample_len, t)
        qi, ki = q[i, :s].transpose(0, 1).float(), k[i, :s].transpose(0, 1).float()  # [H,T,h], [n_kv,T,h]
        c, sn = cos[0, :s].float(), sin[0, :s].float()
        qr, kr = rope_rotate(qi, c, sn), rope_rotate(ki, c, sn)
        kr = kr.repeat_interleave(n_heads // n_kv, dim=0)
        scores = qr @ kr.transpose(-1, -2) * h**-0.5
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        if sliding_window is not None:
            mask &= ~torch.ones(s, s, dtype=torch.bool).tril(-sliding_window)
        probs = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        stats.samples.append((qi, ki, probs))
        stats.x_eval.append(x[i, :s].detach().float())

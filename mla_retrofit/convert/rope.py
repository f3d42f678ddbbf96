"""RoPE-subspace isolation: per-frequency mixing across KV heads and the choice of pairs that keep rotation.

Notation (docs/method.md §2). Keys are flattened per layer as ``u_k[j*h + e]``
(KV head ``j``, dim ``e``), half-split layout: pair ``t`` is dims ``(t, t+h/2)``.
Read a pair as a complex number ``kappa = k_t + i k_{t+h/2}``; RoPE multiplies it
by ``e^{i phi}``. For frequency ``t`` a unitary ``U_t`` (``n_kv x n_kv``) mixes the
heads' pairs: ``kappa'_{p,t} = sum_j U_t[p, j] kappa_{j,t}``. RoPE rotates every
head's pair ``t`` by the same angle, so the mix commutes with RoPE. A real
(orthogonal) ``U_t`` can only add heads' pairs in phase or in opposition; a complex
one also turns each head's pair by its own angle before adding, which lines up
heads whose keys sit at different phases (``complex_mixing``).

A *pair* is ``(p, t)``; its two components are ``a = 0, 1``. Mixed key
coordinate ``(p, t, a)`` lives at row ``p*h + t + a*h/2`` of :func:`mixing_matrix`.
"""

from __future__ import annotations

import torch


def frequency_mixing(key_m2: torch.Tensor, n_kv: int, head_dim: int, query_weight: torch.Tensor | None = None,
                     complex_mixing: bool = False):
    """``U[t]`` (``[h/2, n_kv, n_kv]``, rows = components by decreasing energy) from the key second moment.

    ``key_m2`` is ``E[u_k u_k^T]`` (``n_kv*h`` square). ``query_weight[j, t]``, if
    given, weighs head ``j``'s pair ``t`` by the query energy that reads it.
    ``complex_mixing``: ``U_t`` is the unitary eigenbasis of the Hermitian ``E[kappa kappa^H]``
    (a complex tensor), else the orthogonal eigenbasis of its real part (a real tensor).
    On SmolLM2-135M the first complex component of each of the 24 fastest frequencies leaves 1.5% of
    their query-weighted key energy behind, the first real one 11.7% (``benchmarks/rope_mixing_energy.py``).
    """
    half = head_dim // 2
    m2 = key_m2.double().view(n_kv, head_dim, n_kv, head_dim)
    mixes = []
    for t in range(half):
        c = m2[:, t, :, t] + m2[:, t + half, :, t + half]  # [n_kv, n_kv]: Re E[kappa_i conj(kappa_j)]
        if complex_mixing:  # Im E[kappa_i conj(kappa_j)] = E[k1_i k0_j] - E[k0_i k1_j]
            c = torch.complex(c, m2[:, t + half, :, t] - m2[:, t, :, t + half])
        if query_weight is not None:
            w = query_weight[:, t].clamp_min(0).sqrt().double()
            c = w[:, None] * c * w[None, :]
        evals, evecs = torch.linalg.eigh(0.5 * (c + c.mH))
        order = torch.argsort(evals, descending=True)
        mixes.append(evecs[:, order].mH)  # kappa' = V^H kappa
    out = torch.stack(mixes)
    return out if complex_mixing else out.to(key_m2.dtype)


def at_precision(mix: torch.Tensor, double: bool = True) -> torch.Tensor:
    """``mix`` in (complex) float64 or float32, keeping it complex when it is."""
    if mix.is_complex():
        return mix.to(torch.complex128 if double else torch.complex64)
    return mix.to(torch.float64 if double else torch.float32)


def identity_mixing(n_kv: int, head_dim: int, dtype=torch.float64) -> torch.Tensor:
    return torch.eye(n_kv, dtype=dtype).expand(head_dim // 2, n_kv, n_kv).clone()


def mixing_matrix(mix: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The orthogonal ``[n_kv*h, n_kv*h]`` map ``u_k -> kappa'`` (rows indexed ``p*h + t + a*h/2``).

    A complex ``U_t[p, j] = x + iy`` acts on head ``j``'s pair as the rotation-and-scale
    ``[[x, -y], [y, x]]``."""
    half, n_kv, _ = mix.shape
    re, im = (mix.real, mix.imag) if mix.is_complex() else (mix, None)
    q = torch.zeros(n_kv * head_dim, n_kv * head_dim, dtype=re.dtype)
    for t in range(half):
        r0 = torch.arange(n_kv) * head_dim + t
        r1 = r0 + half
        q[r0[:, None], r0[None, :]] = re[t]
        q[r1[:, None], r1[None, :]] = re[t]
        if im is not None:
            q[r0[:, None], r1[None, :]] = -im[t]
            q[r1[:, None], r0[None, :]] = im[t]
    return q


def pair_rows(pairs: list[tuple[int, int]], head_dim: int) -> torch.Tensor:
    """Rows of :func:`mixing_matrix` for ``pairs`` in half-split order (all first components, then all second)."""
    first = [p * head_dim + t for p, t in pairs]
    return torch.tensor(first + [r + head_dim // 2 for r in first], dtype=torch.long)


def query_maps(mix: torch.Tensor, pairs: list[tuple[int, int]], head_dim: int, rot: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_kv, 2*len(pairs), h]``: for group ``g``, the map from a query head to its query on ``pairs``.

    The query of head ``i`` (group ``g``) on mixed component ``(p, t)`` is ``U_t[p, g] q_i`` (its pair
    read as a complex number). With ``rot`` (``[n_kv groups, n_kv components, h/2, 2]``, the
    ``(a, b)`` of :func:`fit_averaged_rotation`), the pair's score becomes ``q^T (a I + b J) k``
    instead of ``q^T k``: the query is multiplied by ``a + ib`` as well. A factor ``z = x + iy``
    reads ``(x q0 - y q1, y q0 + x q1)``.
    """
    half, n_kv, _ = mix.shape
    n = len(pairs)
    cmix = mix if mix.is_complex() else torch.complex(mix, torch.zeros_like(mix))
    out = torch.zeros(n_kv, 2 * n, head_dim, dtype=cmix.real.dtype)
    for s, (p, t) in enumerate(pairs):
        z = cmix[t, p, :]
        if rot is not None:
            z = z * torch.complex(rot[:, p, t, 0], rot[:, p, t, 1]).to(z.dtype)
        out[:, s, t], out[:, s, t + half] = z.real, -z.imag
        out[:, s + n, t], out[:, s + n, t + half] = z.imag, z.real
    return out


def all_pairs(n_kv: int, head_dim: int) -> list[tuple[int, int]]:
    return [(p, t) for t in range(head_dim // 2) for p in range(n_kv)]


def first_frequency_pairs(n_kv: int, head_dim: int, n_pairs: int) -> list[tuple[int, int]]:
    """Baseline choice: the highest frequencies (smallest ``t``) of every head."""
    return all_pairs(n_kv, head_dim)[:n_pairs]


def deepseek_pairs(head_dim: int, n_pairs: int) -> list[tuple[int, int]]:
    """Component 0 of the ``n_pairs`` fastest frequencies ``t = 0 .. n_pairs-1``.

    They form a geometric table, as DeepSeek's RoPE builds, with ``theta' = theta ** (2 n_pairs / h)``.
    Measured on SmolLM2-135M (h = 64) at 50% KV: with 16 pairs, keeping ``t = 0..15`` gives 1.93x
    the original's held-out perplexity where every other frequency (``t = 0, 2, .., 30``) gives 4.49x.
    """
    half = head_dim // 2
    if not 0 < n_pairs <= half:
        raise ValueError(f"d_R/2 = {n_pairs} must be in 1..head_dim/2 = {half} for a DeepSeek RoPE layout")
    return [(0, t) for t in range(n_pairs)]


def top_pairs(cost: torch.Tensor, n_pairs: int) -> list[tuple[int, int]]:
    """The ``n_pairs`` pairs with the largest cost of dropping their rotation; ``cost`` is ``[n_kv, h/2]``."""
    n_kv, half = cost.shape
    order = torch.argsort(cost.flatten(), descending=True)[:n_pairs].tolist()
    return sorted(((i // half, i % half) for i in order), key=lambda pt: (pt[1], pt[0]))


def _moments(q, k_mixed, attn, weights):
    """``sum_mn W_mn f(q_m) g(k_n)`` for ``f`` in (q0^2, q1^2, q0 q1), ``g`` in (k0^2, k1^2, k0 k1), per pair.

    ``weights`` are ``[h/2, T, T]`` position weights multiplied into ``attn``; returns, for each,
    ``[h/2, H, 3 (f), 3 (g), P]``.
    """
    t_len, head_dim = q.shape[1], q.shape[2]
    half, n_kv = head_dim // 2, k_mixed.shape[0]
    q0, q1 = q[..., :half].permute(2, 0, 1), q[..., half:].permute(2, 0, 1)  # [h/2, H, T]
    k0, k1 = k_mixed[..., :half].permute(2, 0, 1), k_mixed[..., half:].permute(2, 0, 1)  # [h/2, P, T]
    fq = torch.stack([q0 * q0, q1 * q1, q0 * q1], dim=2)  # [h/2, H, 3, T]
    keys = torch.stack([k0 * k0, k1 * k1, k0 * k1], dim=1).reshape(half, 3 * n_kv, t_len).transpose(1, 2)
    out = []
    for w in weights:
        m = torch.matmul(attn.unsqueeze(0) * w.unsqueeze(1), keys.unsqueeze(1))  # [h/2, H, T, 3P]
        out.append(torch.einsum("thfm,thmp->thfp", fq, m).reshape(half, -1, 3, 3, n_kv))
    return out


def _pair_sums(m):
    """From :func:`_moments`: ``sum W dot^2``, ``sum W dot cross``, ``sum W cross^2`` (``[h/2, H, P]`` each),
    with ``dot = q0 k0 + q1 k1`` and ``cross = q0 k1 - q1 k0``."""
    a, b, c = 0, 1, 2  # f/g index: squares of component 0, of component 1, their product
    dd = m[:, :, a, a] + m[:, :, b, b] + 2 * m[:, :, c, c]
    cc = m[:, :, a, b] + m[:, :, b, a] - 2 * m[:, :, c, c]
    dc = m[:, :, a, c] - m[:, :, b, c] + m[:, :, c, b] - m[:, :, c, a]
    return dd, dc, cc


def _turn_queries(m: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Moments of :func:`_moments` as if every query pair had been turned by ``phase`` ``[h/2, H, P]``
    (per component ``P``): ``(q0^2, q1^2, q0 q1)`` of the turned query are linear in the unturned ones."""
    c, s = torch.cos(phase).to(m.dtype), torch.sin(phase).to(m.dtype)
    a = torch.stack([torch.stack([c * c, s * s, -2 * c * s], -1),
                     torch.stack([s * s, c * c, 2 * c * s], -1),
                     torch.stack([c * s, -c * s, c * c - s * s], -1)], -2)  # [h/2, H, P, 3 (new f), 3 (f)]
    return torch.einsum("thpuf,thfgp->thugp", a, m)


def averaged_rotation_sums(q, k_mixed, attn, inv_freq, attention_scaling: float = 1.0, phase=None):
    """Normal equations of the best position-free stand-in for a pair's rotation, per query head.

    A pair that loses its rotation contributes ``q^T M k`` to the score instead of ``q^T R(phi) k``.
    ``M = I`` (what dropping the rotation means) is exact only at distance 0. Among ``M = a I + b J``
    (a fixed rotation and scale, which commutes with the mixing and stays linear), the one that
    minimises the attention-weighted squared score error solves ``S [a, b] = r``. Returns ``(S, r, e)``
    with ``S [h/2, H, P, 2, 2]``, ``r [h/2, H, P, 2]`` and ``e = sum W y^2`` ``[h/2, H, P]``, ``y`` the true term.
    ``phase`` ``[h/2, H, P]``: the angle of a complex mix's ``U_t[p, g(i)]``, which turns head ``i``'s query
    on component ``p`` (:func:`query_maps`) and so changes which stand-in fits best.
    """
    t_len = q.shape[1]
    pos = torch.arange(t_len, dtype=q.dtype)
    phi = (pos[:, None] - pos[None, :])[None] * inv_freq.to(q.dtype)[:, None, None]  # [h/2, T, T]
    s2 = attention_scaling**2
    cos, sin = torch.cos(phi) * s2, torch.sin(phi) * s2
    one = torch.ones_like(cos)
    moments = _moments(q, k_mixed, attn, [one, cos, sin, cos * cos, cos * sin, sin * sin])
    if phase is not None:
        moments = [_turn_queries(m, phase) for m in moments]
    m1, mc, ms, mcc, mcs, mss = moments
    dd, dc, cc = _pair_sums(m1)
    dd_c, dc_c, cc_c = _pair_sums(mc)
    dd_s, dc_s, cc_s = _pair_sums(ms)
    s = torch.stack([torch.stack([dd, dc], -1), torch.stack([dc, cc], -1)], -2)
    r = torch.stack([dd_c + dc_s, dc_c + cc_s], -1)  # y = dot cos + cross sin
    dd_cc, dc_cs, cc_ss = _pair_sums(mcc)[0], _pair_sums(mcs)[1], _pair_sums(mss)[2]
    e = dd_cc + 2 * dc_cs + cc_ss
    return s.double(), r.double(), e.double()


def fit_averaged_rotation(s, r, e, mix, group_of_head, ridge: float = 1e-6):
    """``(a, b)`` per (group, component, frequency) ``[n_kv, P, h/2, 2]`` and the cost of dropping each pair
    with it ``[P, h/2]`` (the remaining weighted squared score error, summed over heads with ``U_t[p, g]^2``).

    ``s``, ``r``, ``e`` are :func:`averaged_rotation_sums` accumulated over the calibration samples.
    """
    half, n_heads, n_p = r.shape[:3]
    n_groups = int(group_of_head.max()) + 1
    onehot = torch.zeros(n_groups, n_heads, dtype=s.dtype)
    onehot[group_of_head, torch.arange(n_heads)] = 1
    sg = torch.einsum("gh,thpij->gtpij", onehot, s)
    rg = torch.einsum("gh,thpi->gtpi", onehot, r)
    eg = torch.einsum("gh,thp->gtp", onehot, e)
    scale = torch.diagonal(sg, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    sg = sg + ridge * scale[..., None, None] * torch.eye(2, dtype=s.dtype)
    ab = torch.linalg.solve(sg, rg.unsqueeze(-1)).squeeze(-1)  # [g, h/2, P, 2]
    resid = (eg - (ab * rg).sum(-1)).clamp_min(0)  # [g, h/2, P]
    coef = at_precision(mix).abs().square().permute(2, 0, 1)  # [g, h/2, P]: |U_t[p, g]|^2
    cost = (coef * resid).sum(0).T  # [P, h/2]
    return ab.permute(0, 2, 1, 3).contiguous(), cost


def unrotated_cost(s, r, e, mix, group_of_head):
    """Attention-weighted squared score error from dropping the rotation of each pair outright, ``[P, h/2]``.

    The term of pair ``(p, t)`` for head ``i`` at query ``m``, key ``n`` is ``q~^T R(phi) kappa'_p`` with
    ``q~ = U_t[p, g(i)] q_i`` and ``phi = (m - n) theta_t``; dropping the rotation puts ``q~^T kappa'_p`` in its
    place. That is the stand-in ``a = 1, b = 0`` of :func:`averaged_rotation_sums` (``s``, ``r``, ``e``, taken
    with the mix's ``phase`` when it is complex), whose residual is ``S_00 - 2 r_0 + e``, summed over the heads
    with ``|U_t[p, g(i)]|^2``."""
    resid = (s[..., 0, 0] - 2 * r[..., 0] + e).clamp_min(0)  # [h/2, H, P]
    coef = at_precision(mix).abs().square()[:, :, group_of_head].transpose(1, 2)  # [h/2, H, P]
    return (coef * resid).sum(1).T.double()

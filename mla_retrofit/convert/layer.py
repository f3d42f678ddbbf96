"""One layer's GQA -> MLA conversion: choose RoPE pairs, factorize K/V, build and measure the MLA attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import factorize, rope
from .calibrate import LayerStats

ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class AttnWeights:
    """The original attention's weights as float64 matrices."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_q: torch.Tensor | None = None
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    b_o: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @classmethod
    def of(cls, attn) -> "AttnWeights":
        def w(mod):
            return mod.weight.detach().double()

        def b(mod):
            return None if mod.bias is None else mod.bias.detach().double()

        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return cls(
            w(attn.q_proj), w(attn.k_proj), w(attn.v_proj), w(attn.o_proj),
            b(attn.q_proj), b(attn.k_proj), b(attn.v_proj), b(attn.o_proj),
            None if qn is None else qn.weight.detach().double(),
            None if kn is None else kn.weight.detach().double(),
        )


@dataclass
class LayerPlan:
    """What was decided for one layer (everything needed to build its MLA attention)."""

    mix: torch.Tensor  # [h/2, n_kv, n_kv]
    kept: list[tuple[int, int]]  # pairs that keep RoPE, in cache order
    dropped: list[tuple[int, int]]
    cost: torch.Tensor | None = None  # [n_kv, h/2] measured cost of dropping each rotation
    info: dict = field(default_factory=dict)
    # [n_kv groups, n_kv components, h/2, 2]: the (a, b) standing in for a dropped pair's rotation
    # (``rope.fit_averaged_rotation``); None: the identity (the rotation simply removed)
    rot: torch.Tensor | None = None


def plan_rope(stats: LayerStats, method: str, rope_dim: int, inv_freq: torch.Tensor, n_heads: int,
              attention_scaling: float = 1.0, layout: str = "free", nope_fit: str = "averaged",
              mixing: str = "complex") -> LayerPlan:
    """Choose the per-frequency mixing and the pairs that keep RoPE.

    ``layout="deepseek"`` keeps the principal mixed component of the ``d_R/2`` fastest frequencies
    (:func:`rope.deepseek_pairs`), a DeepSeek RoPE table: the form the DeepSeek-V3 export needs.
    ``nope_fit="averaged"`` (method ``mla``) gives every dropped pair the attention-averaged rotation
    that best stands in for its real one, and the free layout keeps the pairs whose loss remains
    largest with it; ``"unrotated"`` drops rotations outright. ``mixing="complex"`` (method ``mla``)
    mixes each frequency's heads with a unitary matrix, ``"real"`` with an orthogonal one
    (:func:`rope.frequency_mixing`); ``rorope-pca`` always mixes real, as TransMLA does.
    """
    n_kv, h = stats.n_kv, stats.head_dim
    n_pairs = rope_dim // 2
    pairs = rope.all_pairs(n_kv, h)
    cost = rot = None
    averaged = method == "mla" and nope_fit == "averaged" and bool(stats.samples)
    cplx = method == "mla" and mixing == "complex"
    if layout == "deepseek":
        mix = _mixing(stats, n_kv, h, cplx)
        kept = rope.deepseek_pairs(h, n_pairs)
        if averaged:
            rot, cost = averaged_rotation(stats, mix, inv_freq, n_heads, attention_scaling)
    elif method == "weight-svd":
        mix = rope.identity_mixing(n_kv, h)
        kept = rope.first_frequency_pairs(n_kv, h, n_pairs)
    elif n_pairs >= len(pairs):
        mix, kept = rope.identity_mixing(n_kv, h), pairs
    elif method == "rorope-pca":
        mix = rope.frequency_mixing(stats.key_m2(), n_kv, h)
        energy = _pair_energy(stats.key_m2(), mix, n_kv, h)
        kept = rope.top_pairs(energy, n_pairs)
        cost = energy
    else:
        mix = _mixing(stats, n_kv, h, cplx)
        if averaged:
            rot, cost = averaged_rotation(stats, mix, inv_freq, n_heads, attention_scaling)
        else:
            cost = measured_drop_cost(stats, mix, inv_freq, n_heads, attention_scaling)
        kept = rope.top_pairs(cost, n_pairs)
    kept_set = set(kept)
    dropped = [pt for pt in pairs if pt not in kept_set]
    plan = LayerPlan(mix=mix, kept=kept, dropped=dropped, cost=cost, rot=rot)
    if cost is not None:
        total = float(cost.sum())
        plan.info["rope_cost_kept"] = float(sum(cost[p, t] for p, t in kept) / total) if total > 0 else 1.0
    return plan


def _mixing(stats: LayerStats, n_kv: int, h: int, complex_mixing: bool) -> torch.Tensor:
    """The per-frequency mix of method ``mla``. A real mix weighs each head's pair by the query energy that
    reads it; a complex one does not: weighting helps the real mix and hurts the complex one on SmolLM2
    (``benchmarks/rope_mixing_energy.py``), and applied to unweighted keys a weighted eigenbasis leaves
    energy of two perfectly aligned heads in the second component whenever their queries differ in energy."""
    if complex_mixing:
        return rope.frequency_mixing(stats.key_m2(), n_kv, h, complex_mixing=True)
    return rope.frequency_mixing(stats.key_m2(), n_kv, h, query_weight=_query_energy(stats.query_m2(), h))


def _query_energy(q_m2: torch.Tensor, h: int) -> torch.Tensor:
    diag = torch.diagonal(q_m2, dim1=-2, dim2=-1)  # [n_kv, h]
    return diag[:, : h // 2] + diag[:, h // 2 :]


def _pair_energy(key_m2: torch.Tensor, mix: torch.Tensor, n_kv: int, h: int) -> torch.Tensor:
    qm = rope.mixing_matrix(rope.at_precision(mix), h)
    d = torch.diagonal(qm @ key_m2 @ qm.T).view(n_kv, h)
    return d[:, : h // 2] + d[:, h // 2 :]


def measured_drop_cost(stats: LayerStats, mix, inv_freq, n_heads, attention_scaling=1.0) -> torch.Tensor:
    """:func:`rope.unrotated_cost` on the layer's sampled sequences: what dropping each pair's rotation costs."""
    group = torch.arange(n_heads) // (n_heads // stats.n_kv)
    return rope.unrotated_cost(*_rotation_sums(stats, mix, inv_freq, n_heads, attention_scaling), mix, group)


def _mixed_keys(k: torch.Tensor, mixf: torch.Tensor) -> torch.Tensor:
    """``k [n_kv, T, h]`` -> mixed components per frequency: ``kappa'_p = sum_j U_t[p, j] kappa_j``."""
    half = k.shape[-1] // 2
    k_mixed = torch.empty_like(k)
    k0, k1 = k[..., :half], k[..., half:]
    if mixf.is_complex():
        re, im = mixf.real.contiguous(), mixf.imag.contiguous()
        k_mixed[..., :half] = torch.einsum("tpj,jnt->pnt", re, k0) - torch.einsum("tpj,jnt->pnt", im, k1)
        k_mixed[..., half:] = torch.einsum("tpj,jnt->pnt", im, k0) + torch.einsum("tpj,jnt->pnt", re, k1)
    else:
        k_mixed[..., :half] = torch.einsum("tpj,jnt->pnt", mixf, k0)
        k_mixed[..., half:] = torch.einsum("tpj,jnt->pnt", mixf, k1)
    return k_mixed


def _rotation_sums(stats: LayerStats, mix, inv_freq, n_heads, attention_scaling=1.0):
    """:func:`rope.averaged_rotation_sums` over the layer's sampled sequences (queries turned by a complex
    mix's phase)."""
    group = torch.arange(n_heads) // (n_heads // stats.n_kv)
    mixf = rope.at_precision(mix, double=False)
    phase = torch.angle(mixf)[:, :, group].transpose(1, 2) if mixf.is_complex() else None  # [h/2, H, P]
    sums = None
    for q, k, attn in stats.samples:
        part = rope.averaged_rotation_sums(q, _mixed_keys(k, mixf), attn, inv_freq.float(), attention_scaling, phase)
        sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
    return sums


def averaged_rotation(stats: LayerStats, mix, inv_freq, n_heads, attention_scaling=1.0):
    """``(rot, cost)``: :func:`rope.fit_averaged_rotation` on the layer's sampled sequences."""
    group = torch.arange(n_heads) // (n_heads // stats.n_kv)
    return rope.fit_averaged_rotation(*_rotation_sums(stats, mix, inv_freq, n_heads, attention_scaling), mix, group)


@dataclass
class Targets:
    """``y = T u``: nope keys (mixed, dropped pairs) then values; their statistics and metric blocks."""

    t: torch.Tensor  # [n_y, 2*n_kv*h]
    m_rope: torch.Tensor  # [d_R, n_kv*h]  k_R = m_rope @ u_k
    n_k: int
    cov: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def key_centred_m2(self) -> torch.Tensor:
        """``E[(y - m_k)(y - m_k)^T]`` with ``m_k`` the key rows of the mean (value rows 0).

        The error a bias-free latent makes on the keys matters only up to a constant shift
        (a constant key offset adds the same score to every key of a query); on the values it
        does not (a constant value offset reaches the output).
        """
        m_k = self.mean.clone()
        m_k[self.n_k :] = 0
        return self.m2 - torch.outer(m_k, self.mean) - torch.outer(self.mean, m_k) + torch.outer(m_k, m_k)


def targets(stats: LayerStats, plan: LayerPlan) -> Targets:
    n_kv, h = stats.n_kv, stats.head_dim
    n = n_kv * h
    qm = rope.mixing_matrix(rope.at_precision(plan.mix), h)
    m_k = qm[rope.pair_rows(plan.dropped, h)] if plan.dropped else torch.zeros(0, n, dtype=torch.float64)
    m_rope = qm[rope.pair_rows(plan.kept, h)] if plan.kept else torch.zeros(0, n, dtype=torch.float64)
    t = torch.zeros(m_k.shape[0] + n, 2 * n, dtype=torch.float64)
    t[: m_k.shape[0], :n] = m_k
    t[m_k.shape[0] :, n:] = torch.eye(n, dtype=torch.float64)
    return Targets(
        t=t, m_rope=m_rope, n_k=m_k.shape[0],
        cov=t @ stats.cov() @ t.T, mean=t @ stats.mean(), m2=t @ stats.m2() @ t.T,
    )


def metric(stats: LayerStats, plan: LayerPlan, tg: Targets, w: AttnWeights, n_heads: int, alpha: float) -> torch.Tensor:
    """``blockdiag(alpha G_K / tau_K, G_V / tau_V)``: query-weighted key error, output-weighted value error."""
    n_kv, h = stats.n_kv, stats.head_dim
    group = n_heads // n_kv
    wo = w.w_o.view(w.w_o.shape[0], n_heads, h)
    g_v = torch.zeros(n_kv * h, n_kv * h, dtype=torch.float64)
    for g in range(n_kv):
        blk = wo[:, g * group : (g + 1) * group, :]
        g_v[g * h : (g + 1) * h, g * h : (g + 1) * h] = torch.einsum("dih,die->he", blk, blk)
    n_k = tg.n_k
    out = torch.zeros(n_k + n_kv * h, n_k + n_kv * h, dtype=torch.float64)
    tau_v = torch.trace(g_v @ tg.cov[n_k:, n_k:]).clamp_min(1e-30)
    out[n_k:, n_k:] = g_v / tau_v
    if n_k:
        b = rope.query_maps(rope.at_precision(plan.mix), plan.dropped, h, plan.rot)  # [n_kv, n_k, h]
        g_k = torch.einsum("gah,ghe,gbe->ab", b, stats.query_m2(), b)
        tau_k = torch.trace(g_k @ tg.cov[:n_k, :n_k]).clamp_min(1e-30)
        out[:n_k, :n_k] = alpha * g_k / tau_k
    return out


def factorization(method: str, stats: LayerStats, tg: Targets, w: AttnWeights, rank: int, g: torch.Tensor | None,
                  centre: bool = True):
    """``centre=False`` gives a bias-free latent ``c = B y`` (no mean subtracted, none added back)."""
    if method == "weight-svd":
        w_kv = torch.cat([w.w_k, w.w_v], dim=0)
        return factorize.weight_svd(tg.t @ w_kv, rank)
    if method == "rorope-pca":
        # TransMLA-style: uncentered second moment, keys and values balanced to equal mean energy.
        n_k = tg.n_k
        e_k = torch.diagonal(tg.m2)[:n_k].mean() if n_k else torch.tensor(1.0, dtype=torch.float64)
        e_v = torch.diagonal(tg.m2)[n_k:].mean()
        d = torch.cat([torch.full((n_k,), 1 / e_k.item()), torch.full((tg.m2.shape[0] - n_k,), 1 / e_v.item())])
        fact = factorize.activation_pca(tg.m2, torch.zeros_like(tg.mean), rank, torch.diag(d).double())
        return fact
    if not centre:
        return factorize.activation_pca(tg.key_centred_m2(), torch.zeros_like(tg.mean), rank, g)
    return factorize.activation_pca(tg.cov, tg.mean, rank, g)


def refit_values(fact, tg: Targets, stats: LayerStats, eps: float = 1e-6, centre: torch.Tensor | None = None):
    """Least-squares value up-projection for the latent ``fact`` already chose, judged on attention outputs.

    A head outputs ``W_o,i sum_n a_imn v_n``: with the down-projection fixed, the value rows of
    ``up`` that minimise that error are ``Cov(v~, c~) Cov(c~)^-1`` with ``c~ = B (u~ - mu)``, using the
    attention-averaged statistics of each KV group's heads (``mu`` = ``centre``, default the token
    mean; zeros for a bias-free latent). Returns ``None`` without those statistics.
    """
    att = stats.attended_cov(centre)
    if att is None:
        return None
    h, n_k = stats.head_dim, tg.n_k
    up = fact.up.clone()
    b = fact.down
    for g in range(stats.n_kv):
        c_y = tg.t @ att[g] @ tg.t.T  # [n_y, n_y]
        cc = b @ c_y @ b.T
        cc = cc + eps * torch.trace(cc) / cc.shape[0] * torch.eye(cc.shape[0], dtype=cc.dtype)
        rows = slice(n_k + g * h, n_k + (g + 1) * h)
        up[rows] = torch.linalg.solve(cc, (c_y[rows] @ b.T).T).T
    return factorize.Factorization(down=fact.down, up=up, mean=fact.mean, spectrum=fact.spectrum)


def attention_state(
    w: AttnWeights, plan: LayerPlan, tg: Targets, fact, mu_u: torch.Tensor, n_heads: int, h: int, normed: bool
) -> dict:
    """State dict of :class:`MLARetrofitAttention` realising ``plan`` and ``fact`` (float64).

    ``mu_u`` is the mean of ``u`` that ``fact`` was centred on (zeros for uncentred factorizations).
    """
    n_kv = plan.mix.shape[1]
    n = n_kv * h
    d_u = fact.down @ tg.t  # [r, 2n]: c = d_u (u - mu_u)
    # u = W_kv x + b_kv  (hidden mode)  or  u = [k_norm(k); v]  (normed mode)
    zeros = lambda m: torch.zeros(m, dtype=torch.float64)  # noqa: E731
    if normed:
        a_w = torch.cat([d_u, torch.cat([tg.m_rope, torch.zeros(tg.m_rope.shape[0], n, dtype=torch.float64)], 1)])
        a_b = torch.cat([-d_u @ mu_u, zeros(tg.m_rope.shape[0])])
    else:
        w_kv = torch.cat([w.w_k, w.w_v])
        b_kv = torch.cat([w.b_k if w.b_k is not None else zeros(n), w.b_v if w.b_v is not None else zeros(n)])
        a_w = torch.cat([d_u @ w_kv, tg.m_rope @ w.w_k])
        a_b = torch.cat([d_u @ (b_kv - mu_u), tg.m_rope @ b_kv[:n]])
    up_k, up_v = fact.up[: tg.n_k], fact.up[tg.n_k :]
    b = rope.query_maps(rope.at_precision(plan.mix), plan.dropped, h, plan.rot)  # [n_kv, n_k, h]
    k_up = torch.einsum("gah,ar->ghr", b, up_k).reshape(n, -1) if tg.n_k else torch.zeros(n, fact.rank, dtype=torch.float64)
    mean_v = (fact.mean[tg.n_k :]).view(n_kv, h).repeat_interleave(n_heads // n_kv, 0).flatten()
    b_o = (w.b_o if w.b_o is not None else zeros(w.w_o.shape[0])) + w.w_o @ mean_v
    state = {
        "q_proj.weight": w.w_q,
        "kv_a_proj.weight": a_w,
        "kv_a_proj.bias": a_b,
        "q_rope": rope.query_maps(rope.at_precision(plan.mix), plan.kept, h),
        "k_up.weight": k_up,
        "v_up.weight": up_v,
        "o_proj.weight": w.w_o,
        "o_proj.bias": b_o,
    }
    if w.b_q is not None:
        state["q_proj.bias"] = w.b_q
    if w.q_norm is not None:
        state["q_norm.weight"] = w.q_norm
    if normed:
        state["k_proj.weight"], state["v_proj.weight"] = w.w_k, w.w_v
        if w.b_k is not None:
            state["k_proj.bias"], state["v_proj.bias"] = w.b_k, w.b_v
        if w.k_norm is not None:
            state["k_norm.weight"] = w.k_norm
    return state


def drop_zero_biases(state: dict, wanted) -> dict:
    """Leave out the bias tensors the MLA layer has no parameter for (they are zero: a bias-free latent)."""
    extra = [k for k in state if k not in wanted]
    for k in extra:
        if not k.endswith(".bias") or float(state[k].abs().max()) > 0:
            raise RuntimeError(f"conversion produced '{k}' but the MLA layer has no such parameter")
    return {k: v for k, v in state.items() if k in wanted}


def keep_freqs(plan, first_plan):
    """In ``propagate='converted'`` mode the cache layout (kept pairs) stays that of pass A."""
    plan.kept, plan.dropped = first_plan.kept, first_plan.dropped
    return plan

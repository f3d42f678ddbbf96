"""Fit DeepSeek's single RoPE table to the frequencies a native MLA checkpoint kept.

DeepSeek-V3 builds one table for every layer from ``qk_rope_head_dim`` and
``rope_theta``: pair ``j`` turns at ``theta' ** (-2 j / d_R')`` (then through the
configured rope scaling). A native layer keeps pairs at indices ``t`` of the
source head's table ``theta ** (-2 t / h)``. The two agree exactly when every
kept ``t`` is ``j * s`` for one step ``s`` and ``theta' = theta ** (s d_R' / h)``:
pair ``t`` goes to table slot ``j = t / s``. Slots no layer uses get zero
weights (``pad``), which costs cache dims but keeps the scores exact.

Everything here is pure: numbers in, a :class:`RopeTable` out. Candidate
tables are checked numerically against the source frequencies, so rope scaling
(llama3, linear, yarn) is verified rather than assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UserError

FREQ_RTOL = 1e-5  # float32 tables computed two ways differ by a few ulp
STATIC_SCALINGS = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeTable:
    """Where every layer's kept pairs sit in the DeepSeek table, and the config that builds it."""

    rope_parameters: dict
    n_pairs: int  # d_R' / 2
    slots: list[list[int]]  # per layer, the table slot of each kept pair (native order)
    step: int
    attention_scaling: float  # DeepSeek's cos/sin factor for this table
    max_freq_rel_error: float = 0.0
    engine_ok: bool = True  # vLLM rewrites any non-default rope type of a DeepSeek model (deepseek_yarn)
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return 2 * self.n_pairs


def check_distinct(freq_idx: list[list[int]]) -> None:
    for layer, idx in enumerate(freq_idx):
        if len(set(idx)) != len(idx):
            dup = sorted({t for t in idx if idx.count(t) > 1})
            raise UserError(
                f"layer {layer} keeps several RoPE components at frequency index {dup[0]}: DeepSeek's single "
                "shared RoPE key has one pair per frequency; re-convert with --engine (or --rope-layout deepseek)"
            )


def choose_step(union: list[int], exact: bool, max_pairs: int | None) -> tuple[int, int]:
    """``(step, n_pairs)`` of the smallest table holding every kept index; ``exact`` forbids empty slots."""
    if exact:
        n = len(union)
        step = union[1] - union[0] if n > 1 else 1
        if union != [j * step for j in range(n)]:
            raise UserError(
                f"the kept RoPE frequency indices {union} are not 0, s, 2s, ...: no DeepSeek table matches them "
                "without empty slots; pass pad_rope=True (costs cache dims) or re-convert with --engine (or --rope-layout deepseek)"
            )
        return step, n
    step = 0
    for t in union:
        step = math.gcd(step, t)
    step = step or 1
    n = union[-1] // step + 1
    if max_pairs is not None and n > max_pairs:
        raise UserError(
            f"the kept RoPE frequency indices {union} need a table of {n} pairs (step {step}), more than the "
            f"{max_pairs} pairs (qk_rope_head_dim {2 * max_pairs}) asked for"
        )
    return step, (max_pairs if max_pairs is not None else n)


def deepseek_inv_freq(rope_parameters: dict, n_pairs: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """The table transformers' DeepseekV3RotaryEmbedding builds for these settings."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    cfg = DeepseekV3Config(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, qk_rope_head_dim=2 * n_pairs, qk_nope_head_dim=2, v_head_dim=2, kv_lora_rank=2,
        q_lora_rank=None, n_routed_experts=1, n_group=1, topk_group=1, num_experts_per_tok=1,
        first_k_dense_replace=1, max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
    )
    rot = DeepseekV3RotaryEmbedding(cfg)
    return rot.inv_freq.double(), float(rot.attention_scaling)


def unit_yarn(theta: float, max_position_embeddings: int) -> dict:
    """DeepSeek's yarn at factor 1: the plain table (every frequency and the softmax scale unchanged) spelled as the
    RoPE that DeepSeek-V3 itself ships, so engines take their DeepSeek RoPE path (see ``ExportConfig.yarn_rope``)."""
    return {"rope_type": "yarn", "rope_theta": theta, "factor": 1.0,
            "original_max_position_embeddings": max_position_embeddings, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}


def is_unit_yarn(params: dict) -> bool:
    return params.get("rope_type") == "yarn" and float(params.get("factor", 0.0)) == 1.0


def candidates(src_params: dict, theta_new: float, yarn_max_pos: int | None = None) -> list[tuple[dict, bool]]:
    """Rope settings to try, engine-friendly (plain table, or its factor-1 yarn spelling) first."""
    plain = unit_yarn(theta_new, yarn_max_pos) if yarn_max_pos else {"rope_type": "default", "rope_theta": theta_new}
    out = [(plain, True)]
    if src_params.get("rope_type", "default") != "default":
        out.append(({**src_params, "rope_theta": theta_new}, False))
    return out


def fit_rope_table(
    freq_idx: list[list[int]],
    src_inv_freq: torch.Tensor,
    src_params: dict,
    head_dim: int,
    max_position_embeddings: int,
    pad: bool = False,
    target_pairs: int | None = None,
    yarn: bool = False,
) -> RopeTable:
    """The DeepSeek RoPE table reproducing every layer's kept frequencies, or a one-line :class:`UserError`."""
    check_distinct(freq_idx)
    rope_type = src_params.get("rope_type", "default")
    if rope_type not in STATIC_SCALINGS:
        raise UserError(
            f"rope type '{rope_type}' changes with sequence length; the DeepSeek export supports {', '.join(STATIC_SCALINGS)}"
        )
    union = sorted({t for idx in freq_idx for t in idx})
    if not union:
        raise UserError("the model keeps no RoPE dims; DeepSeek-V3 needs qk_rope_head_dim > 0")
    exact = not pad and target_pairs is None
    if exact and any(sorted(idx) != union for idx in freq_idx):
        raise UserError(
            "layers keep different RoPE frequencies but DeepSeek has one table for all layers; pass pad_rope=True "
            "(zero slots, costs cache dims) or re-convert with --engine (or --rope-layout deepseek)"
        )
    step, n_pairs = choose_step(union, exact, target_pairs)
    theta = float(src_params["rope_theta"])
    theta_new = theta ** (step * 2 * n_pairs / head_dim)
    want = src_inv_freq.double()[union]
    slots_of = {t: t // step for t in union}
    tried = []
    for params, engine_ok in candidates(src_params, theta_new, max_position_embeddings if yarn else None):
        try:
            inv, scale = deepseek_inv_freq(params, n_pairs, max_position_embeddings)
        except Exception as e:  # a scaling the DeepSeek config rejects: try the next candidate
            tried.append(f"{params.get('rope_type')}: {e}")
            continue
        got = inv[[slots_of[t] for t in union]]
        err = float(((got - want).abs() / want.abs()).max())
        if err <= FREQ_RTOL:
            table = RopeTable(
                rope_parameters=params, n_pairs=n_pairs, slots=[[slots_of[t] for t in idx] for idx in freq_idx],
                step=step, attention_scaling=scale, max_freq_rel_error=err, engine_ok=engine_ok,
            )
            if not engine_ok:
                table.notes.append(
                    f"RoPE uses rope_type '{params['rope_type']}' (exact in transformers); vLLM rewrites any non-default "
                    "rope type of a DeepSeek model to its own DeepSeek scalings, so it will not reproduce these frequencies"
                )
            return table
        tried.append(f"{params.get('rope_type')}: max relative frequency error {err:.2e}")
    raise UserError(
        f"no DeepSeek RoPE table reproduces the kept frequencies (step {step}, {n_pairs} pairs; "
        + "; ".join(tried) + ")"
    )


def rope_rows(slots: list[int], n_pairs: int, interleave: bool) -> torch.Tensor:
    """DeepSeek rope row of each native rope dim (``[2 * len(slots)]``).

    Native dims are ``[first components of the kept pairs..., second components...]``;
    DeepSeek's half-split layout puts slot ``j`` at dims ``(j, j + n_pairs)``, the
    interleaved one at ``(2j, 2j + 1)``.
    """
    j = torch.tensor(slots, dtype=torch.long)
    if interleave:
        return torch.cat([2 * j, 2 * j + 1])
    return torch.cat([j, j + n_pairs])


def scatter_rows(native: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Place the rows of ``native`` (``[2n, ...]``) at ``rows`` of a zero ``[dim, ...]`` tensor."""
    out = native.new_zeros((dim,) + tuple(native.shape[1:]))
    out[rows] = native
    return out

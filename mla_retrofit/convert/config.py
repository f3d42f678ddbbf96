"""What a conversion is asked to do: :class:`ConvertConfig`, validated once at the edge.

Every field is a ``convert`` flag and a key of its ``--config`` file; the CLI passes only what was typed,
so the defaults below are the only ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .. import dtypes
from ..data import TEACHER_SAMPLES
from ..errors import UserError
from ..typed import Config

#: the conversion methods: ours, and two baselines from the literature inside the same tool
METHODS = ("mla", "rorope-pca", "weight-svd")


class ConvertConfig(Config):
    model: str
    output: str
    kv_ratio: float | None = Field(None, gt=0, le=1)  # None: 0.5 unless --kv-dim or --rank sets the budget
    kv_dim: int | None = Field(None, ge=1)
    rank: int | None = Field(None, ge=1)
    rope_dim: int | None = Field(None, ge=0)
    method: Literal["mla", "rorope-pca", "weight-svd"] = "mla"
    rank_allocation: Literal["adaptive", "uniform", "sensitivity"] = "sensitivity"
    sensitivity_samples: int = Field(4, ge=1)  # calibration windows the layer sensitivities are measured on
    sensitivity_power: float = Field(0.5, ge=0, le=1)  # weights s_l ** power (0: the eigen-tail rule, adaptive)
    min_rank_fraction: float = Field(0.25, gt=0, le=1)
    # half text sampled from the source itself (convert/teacher.py), half stdlib docstrings (docs/benchmarks.md §9);
    # one spec or several joined by '+': teacher-samples, builtin, a .jsonl/.parquet/.txt file, a Hub dataset id
    calib: str = "teacher-samples+builtin"
    # None: 32 windows when the source samples part of them (as good as 64 on SmolLM2, docs/benchmarks.md §9;
    # sampling is most of the cost), else 64
    calib_samples: int | None = Field(None, ge=1)
    calib_seq_len: int = Field(512, ge=16)
    calib_seed: int = Field(1, ge=0)  # documents shuffled with this seed before windows are cut; 0: corpus order
    batch_size: int = Field(8, ge=1)
    propagate: Literal["original", "converted"] = "original"
    eval_samples: int = Field(4, ge=1)
    eval_seq_len: int = Field(256, ge=1)
    value_fit: Literal["attention", "token"] = "attention"
    rope_layout: Literal["free", "deepseek"] = "free"
    # dropped RoPE pairs: "averaged" stands in the attention-averaged rotation, "unrotated" removes it
    nope_fit: Literal["averaged", "unrotated"] = "averaged"
    # each frequency's KV heads mixed by a unitary (complex: each head's pair turned by its own angle before
    # adding) or an orthogonal (real) matrix; both commute with RoPE and export (docs/method.md §2)
    rope_mixing: Literal["complex", "real"] = "complex"
    centre: bool = True  # False: bias-free latent (no centring), exact in the bias-free engine export
    att_samples: int = Field(16, ge=0)
    # after a layer is factorized, its o_proj is refit in closed form (ridge least squares toward the source's
    # o_proj) so that, on the calibration text, the converted model's residual stream after that attention lands
    # on the source's (docs/method.md §3; docs/benchmarks.md §9)
    refit_output: bool = True
    # relative to the mean input energy of o_proj; 0.1 beat 1 on SmolLM2 at both draws, both budgets and in the
    # engine form (docs/benchmarks.md §9)
    refit_ridge: float = Field(0.1, gt=0)
    # the form engines serve (export --engine): DeepSeek RoPE table, one rank for all layers, bias-free latent
    engine: bool = False
    dtype: str = "auto"
    overwrite: bool = False
    resume: bool = False  # continue the partial run a killed conversion left next to the output

    @model_validator(mode="after")
    def _checked(self):
        self.validate()
        return self

    def validate(self) -> None:
        """The checks across fields (the single-field ones are the types and bounds above)."""
        given = [f for f, v in (("--kv-ratio", self.kv_ratio), ("--kv-dim", self.kv_dim), ("--rank", self.rank))
                 if v is not None]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)} each set the cache budget; give only one of them")
        if self.rope_dim is not None and (self.rope_dim < 0 or self.rope_dim % 2):
            raise UserError(f"--rope-dim must be an even number, got {self.rope_dim}")
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype, "--dtype", auto=True))
        sampled = TEACHER_SAMPLES in calib_parts(self.calib)
        if self.calib_samples is None:
            object.__setattr__(self, "calib_samples", 32 if sampled else 64)
        if self.engine:
            for name, need, flag in ENGINE_FORM:
                if name in self.model_fields_set and getattr(self, name) != need:
                    raise UserError(f"--engine converts to the form engines serve, which needs {flag}; "
                                    f"drop --{name.replace('_', '-')} or --engine")
                object.__setattr__(self, name, need)


#: what ``--engine`` sets: (field, value, the flag that means it)
ENGINE_FORM = (("method", "mla", "--method mla"), ("rope_layout", "deepseek", "--rope-layout deepseek"),
               ("rank_allocation", "uniform", "--rank-allocation uniform (one rank for every layer)"),
               ("centre", False, "--no-centre (no bias on the latent)"))


def calib_parts(spec: str) -> list[str]:
    """The parts of a ``--calib`` mixture (``teacher-samples+builtin``); an existing path is one part."""
    if "+" not in spec or Path(spec).expanduser().exists():
        return [spec]
    parts = spec.split("+")
    if any(not p.strip() for p in parts):
        raise UserError(f"--calib {spec!r}: a mixture joins data specs with '+', e.g. teacher-samples+builtin")
    return [p.strip() for p in parts]

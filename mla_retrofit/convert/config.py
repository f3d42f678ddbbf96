"""What a conversion is asked to do: :class:`ConvertConfig`, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from .. import dtypes
from ..errors import UserError
from .layer import METHODS

@dataclass
class ConvertConfig:
    model: str
    output: str
    kv_ratio: float | None = None  # None: 0.5 unless --kv-dim or --rank sets the budget
    kv_dim: int | None = None
    rank: int | None = None
    rope_dim: int | None = None
    method: str = "mla"
    rank_allocation: str = "adaptive"
    min_rank_fraction: float = 0.25
    calib: str = "builtin"
    calib_samples: int = 64
    calib_seq_len: int = 512
    batch_size: int = 8
    propagate: str = "original"
    eval_samples: int = 4
    eval_seq_len: int = 256
    value_fit: str = "attention"
    rope_layout: str = "free"
    centre: bool = True  # False: bias-free latent (no centring), exact in the bias-free engine export
    att_samples: int = 16
    dtype: str = "auto"
    overwrite: bool = False
    resume: bool = False  # continue the partial run a killed conversion left next to the output

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.rank_allocation not in ("adaptive", "uniform"):
            raise UserError("--rank-allocation must be 'adaptive' or 'uniform'")
        if self.rope_layout not in ("free", "deepseek"):
            raise UserError("--rope-layout must be 'free' or 'deepseek'")
        if self.value_fit not in ("attention", "token"):
            raise UserError("--value-fit must be 'attention' or 'token'")
        if self.propagate not in ("original", "converted"):
            raise UserError("--propagate must be 'original' or 'converted'")
        if self.resume and self.overwrite:
            raise UserError("--resume continues a partial run and --overwrite discards it; give one of them")
        given = [f for f, v in (("--kv-ratio", self.kv_ratio), ("--kv-dim", self.kv_dim), ("--rank", self.rank))
                 if v is not None]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)} each set the cache budget; give only one of them")
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise UserError(f"--kv-ratio must be in (0, 1], got {self.kv_ratio}")
        if self.calib_samples < 1 or self.calib_seq_len < 16:
            raise UserError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
        if self.rope_dim is not None and (self.rope_dim < 0 or self.rope_dim % 2):
            raise UserError(f"--rope-dim must be an even number >= 0, got {self.rope_dim}")
        for name in ("batch_size", "eval_samples", "eval_seq_len", "kv_dim", "rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.att_samples < 0:
            raise UserError(f"--att-samples must be >= 0, got {self.att_samples}")
        if not 0 < self.min_rank_fraction <= 1:
            raise UserError(f"--min-rank-fraction must be in (0, 1], got {self.min_rank_fraction}")
        self.dtype = dtypes.canonical(self.dtype, "--dtype", auto=True)

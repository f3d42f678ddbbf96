"""What a heal run is asked to do: the typed config, its presets, and validation at the edge.

Every field left ``None`` is filled by the preset (``cpu-demo``, ``gpu-7b``)
and then by :data:`BASE`; :meth:`HealConfig.resolved` returns the filled copy
that the recipe runs and writes next to its output.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from ..data import SMOLTALK, TEACHER_SAMPLES
from ..errors import UserError
from ..typed import Config

PHASES = ("imitate", "mla-only", "full")  # the three healing phases, in order

#: Defaults filled in when neither the user nor the preset sets a field.
BASE: dict = dict(
    data=SMOLTALK, steps=300, seq_len=1024, batch_size=4, grad_accum=4, lr=5e-5, full_lr_scale=0.2,
    warmup_fraction=0.05, save_every=100, imitate_lr_scale=1.0, full_ce_weight=0.0, samples=512, loss_chunk=1024,
    split=(0.25, 0.5, 0.25),
)

#: ``cpu-demo``: SmolLM2-135M on a 2-core CPU, fully offline, distilling on text sampled from the
#: teacher (docs/benchmarks.md has its wall time and effect). Windows of 512 tokens, not 256 at the same
#: tokens per step: the heal repairs the positions it trains on (§7 measures the KL by position). Most
#: steps go to phase 1, whose steps cost about 60% of phase 2's and which moved the held-out KL most per
#: second (§7, "A cheaper step, spent on phase 1"), at 8x phase 2's learning rate, which a local
#: regression takes and a short budget needs (§7, "Phase 1's learning rate"). Sized for bf16 autocast on
#: a CPU with AMX or AVX-512 BF16 (under 30 minutes on an AMX 2-core Xeon); in float32 an earlier budget took
#: twice bf16's time.
#: ``gpu-7b``: a distillation budget for 7B models on one 8-GPU node (``accelerate launch``); SmolTalk
#: when the Hub is reachable, with a little next-token loss in phase 3. Not checked on a GPU yet.
PRESETS: dict[str, dict] = {
    "cpu-demo": dict(
        data=TEACHER_SAMPLES, samples=192, steps=640, split=(0.6, 0.35, 0.05), seq_len=512, batch_size=2,
        grad_accum=1, lr=1e-4, imitate_lr_scale=8.0, full_lr_scale=0.2, warmup_fraction=0.1, save_every=20,
    ),
    "gpu-7b": dict(
        tokens=500_000_000, seq_len=2048, batch_size=4, grad_accum=8, lr=5e-5, full_lr_scale=0.2,
        warmup_fraction=0.03, save_every=200, gradient_checkpointing=True, full_ce_weight=0.1, loss_chunk=256,
    ),
}

#: Fields that may change between an interrupted run and its resumption.
RESUME_FREE = ("resume", "overwrite", "dry_run", "save_every", "log_every", "keep_checkpoints", "cleanup",
               "eval_every")
FILLED = ("split", "loss_chunk", "data", "seq_len", "batch_size", "grad_accum", "lr", "full_lr_scale",
          "imitate_lr_scale", "warmup_fraction", "save_every", "gradient_checkpointing", "full_ce_weight", "samples")


class HealConfig(Config):
    model: str  # a converted MLA checkpoint directory
    output: str
    teacher: str | None = None  # None: conversion.json's source_model
    data: str | None = None  # None: the preset's (cpu-demo: teacher-samples), else SmolTalk
    tokens: int | None = None  # total budget over all phases (or ``steps``)
    steps: int | None = None
    split: tuple[float, float, float] | None = None  # share of the steps per phase (None: the preset's, else 25/50/25)
    preset: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None  # sequences per micro-batch per process
    grad_accum: int | None = None
    lr: float | None = None  # peak learning rate of phase 2 (and of phases 1 and 3 times their scales)
    imitate_lr_scale: float | None = None  # phase 1 peak lr = lr * imitate_lr_scale (default 1; cpu-demo: see PRESETS)
    full_lr_scale: float | None = None  # phase 3 peak lr = lr * full_lr_scale
    warmup_fraction: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int | None = None  # checkpoint every N steps inside a phase (0: only at phase ends)
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    distill: float = 1.0  # phases 2 and 3: weight of KL(teacher || student), every position, full vocabulary
    ce_weight: float = 0.0  # phase 2: weight of next-token loss on the target tokens
    hidden_weight: float = 0.0  # phases 2 and 3: weight of matching every layer's residual stream to the teacher's
    full_ce_weight: float | None = None  # phase 3: the same (gpu-7b: 0.1 on instruction data)
    loss_chunk: int | None = None  # tokens per slice (default 1024; gpu-7b 256) of the chunked KL (no full B x T x V float32 tensor)
    dev_fraction: float = 0.05  # share of the training documents held out as the dev split of the gate
    dev_windows: int = 8  # dev windows of seq_len tokens scored by the gate
    eval_every: int = 0  # also score the dev split every N steps inside a phase (0: only at phase ends)
    keep_last: bool = False  # keep a phase even when it makes the dev KL worse
    refit: bool = False  # closed-form refit of every o_proj toward the teacher's residual stream, before phase 1
    refit_windows: int = 16  # training windows the refit solves on
    refit_ridge: float = 1e-2  # ridge toward the current weights, relative to the mean input energy
    imitate_metric: Literal["mse", "fisher"] = "mse"  # phase 1's error: relative MSE, or in the teacher's Fisher metric
    fisher_ridge: float = 0.1  # imitate_metric fisher: share of plain MSE mixed into the metric (1: plain MSE)
    fisher_windows: int = 8  # imitate_metric fisher: training windows the Fisher is estimated on
    max_rows: int = 20000  # rows sampled (shuffled) from a Hub dataset
    samples: int | None = None  # teacher-samples: how many texts to sample from the teacher
    sample_tokens: int | None = None  # teacher-samples: new tokens per text (default: seq_len)
    sample_top_p: float = 1.0  # teacher-samples: nucleus mass at temperature 1 (1.0: plain sampling)
    gradient_checkpointing: bool | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # matmuls of training and sampling; auto: bf16 on CUDA and bf16-native CPUs
    dry_run: bool = False
    seed: int = 0
    overwrite: bool = False
    cleanup: bool = True  # remove OUT/checkpoints once the healed model is written

    @model_validator(mode="after")
    def _checked(self):
        self.validate()
        return self

    def resolved(self) -> HealConfig:
        """A copy with every ``None`` default filled from the preset, then :data:`BASE`."""
        self.validate()
        preset = PRESETS.get(self.preset or "", {})
        values = {}
        for name in FILLED:
            if getattr(self, name) is None:
                values[name] = preset.get(name, BASE.get(name, False))
        if self.tokens is None and self.steps is None:
            values["tokens"] = preset.get("tokens")
            values["steps"] = preset.get("steps", BASE["steps"] if "tokens" not in preset else None)
        out = HealConfig(**{**self.model_dump(), **values})
        if out.sample_tokens is None:
            out = HealConfig(**{**out.model_dump(), "sample_tokens": out.seq_len})
        return out

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
        if self.tokens is not None and self.steps is not None:
            raise UserError("give either --tokens or --steps as the budget, not both")
        _positive(self, ("tokens", "steps", "seq_len", "batch_size", "grad_accum", "lr", "keep_checkpoints",
                         "log_every", "full_lr_scale", "imitate_lr_scale", "loss_chunk", "dev_windows", "max_rows",
                         "samples", "refit_windows", "sample_tokens", "fisher_windows"))
        if self.seq_len is not None and self.seq_len < 8:
            raise UserError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.split is not None:
            _check_split(self.split)
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise UserError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("distill", "ce_weight", "hidden_weight", "full_ce_weight", "max_grad_norm", "weight_decay", "eval_every",
                     "refit_ridge"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.distill == 0 and self.ce_weight == 0 and self.hidden_weight == 0 and (self.split or BASE["split"])[1] > 0:
            raise UserError("phase 2 has no objective: --distill, --ce-weight and --hidden-weight are all 0")
        if not 0 < self.fisher_ridge <= 1:
            raise UserError(f"--fisher-ridge must be in (0, 1], got {self.fisher_ridge}")
        if not 0 <= self.dev_fraction < 0.5:
            raise UserError(f"--dev-fraction must be in [0, 0.5), got {self.dev_fraction}")
        if not 0 < self.sample_top_p <= 1:
            raise UserError(f"--sample-top-p must be in (0, 1], got {self.sample_top_p}")
        if self.save_every is not None and self.save_every < 0:
            raise UserError(f"--save-every must be >= 0, got {self.save_every}")
        if self.model.rstrip("/") == self.output.rstrip("/"):
            raise UserError("the output directory must differ from the converted model directory")

    def as_dict(self) -> dict:
        d = self.model_dump()
        d["split"] = None if self.split is None else list(self.split)
        return d

    def mismatches(self, saved: dict) -> list[str]:
        """Fields (other than :data:`RESUME_FREE`) whose value differs from a saved resolved config."""
        now = self.as_dict()
        return [k for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]


def _positive(cfg: HealConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def parse_split(split) -> tuple[float, float, float]:
    """``"0.25,0.5,0.25"`` (or a list) -> three floats; a one-line error otherwise."""
    if isinstance(split, str):
        split = split.split(",")
    _check_split(split)
    return tuple(float(s) for s in split)


def _check_split(split) -> None:
    try:
        parts = [float(s) for s in split]
    except (TypeError, ValueError) as e:
        raise UserError(f"--split must be 3 numbers like 0.25,0.5,0.25, got {split!r}") from e
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--split must be 3 numbers >= 0 with a positive sum (one per phase), got {split!r}")

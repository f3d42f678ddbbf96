"""The budget of a heal run spread over its phases: steps, tokens, learning rates, trainable parameters.

Pure arithmetic on a resolved :class:`HealConfig`; ``dry_run`` returns this and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import PHASES, HealConfig


@dataclass
class PhasePlan:
    index: int  # 1, 2 or 3
    name: str
    steps: int
    lr: float
    warmup_steps: int
    sequences: int  # packed sequences consumed over all processes
    tokens: int
    trainable_params: int = 0
    first_sequence: int = 0  # offset of this phase's data in the run's sequence stream


@dataclass
class Plan:
    phases: list[PhasePlan]
    seq_len: int
    batch_size: int
    grad_accum: int
    world_size: int
    teacher: str | None
    data: str
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    @property
    def total_sequences(self) -> int:
        return sum(p.sequences for p in self.phases)

    def phase(self, name: str) -> PhasePlan | None:
        return next((p for p in self.phases if p.name == name), None)

    def describe(self) -> str:
        lines = [
            f"heal plan: {self.total_steps} steps, {self.total_tokens:,} tokens "
            f"(seq_len {self.seq_len} x batch {self.batch_size} x accum {self.grad_accum} x {self.world_size} process(es))",
            f"data: {self.data}; teacher: {self.teacher or '-'}",
        ]
        for p in self.phases:
            lines.append(
                f"  phase {p.index} {p.name:<9} {p.steps:>6} steps  {p.tokens:>12,} tokens  lr {p.lr:.2e}  "
                f"warmup {p.warmup_steps}  trainable {p.trainable_params:,} / {self.total_params:,} params"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def split_steps(total: int, split: tuple[float, float, float]) -> list[int]:
    """``total`` steps in proportion to ``split`` (largest remainders); a positive share gets at least one step."""
    exact = [total * f / sum(split) for f in split]
    steps = [int(x) for x in exact]
    by_remainder = sorted(range(len(split)), key=lambda i: exact[i] - steps[i], reverse=True)
    for i in by_remainder[: total - sum(steps)]:
        steps[i] += 1
    return [max(n, 1) if f > 0 else 0 for n, f in zip(steps, split)]


def warmup_steps(fraction: float, steps: int) -> int:
    """Warm-up steps of a phase: at least one whenever warm-up is asked for (a cold AdamW first step is large)."""
    return 0 if fraction <= 0 else min(steps, max(1, int(fraction * steps)))


def total_steps(cfg: HealConfig, world_size: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil(cfg.tokens / per_step))


def make_plan(cfg: HealConfig, world_size: int, params: dict[str, int], teacher: str | None) -> Plan:
    """``cfg`` must be resolved; ``params`` maps ``attention`` and ``total`` to parameter counts."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    phases, offset = [], 0
    for i, (name, n) in enumerate(zip(PHASES, split_steps(total_steps(cfg, world_size), cfg.split))):
        if n == 0:
            continue
        lr = cfg.lr * {"imitate": cfg.imitate_lr_scale, "full": cfg.full_lr_scale}.get(name, 1.0)
        trainable = params.get("full", params["total"]) if name == "full" else params["attention"]
        phases.append(PhasePlan(
            index=i + 1, name=name, steps=n, lr=lr, warmup_steps=warmup_steps(cfg.warmup_fraction, n),
            sequences=n * per_step, tokens=n * per_step * cfg.seq_len, trainable_params=trainable,
            first_sequence=offset,
        ))
        offset += n * per_step
    return Plan(phases=phases, seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                world_size=world_size, teacher=teacher, data=cfg.data, total_params=params["total"])

"""What a heal reports: one :class:`PhaseResult` per phase and the run's :class:`HealResult` (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import Plan


@dataclass
class PhaseResult:
    name: str
    steps: int
    tokens: int
    final_loss: float | None
    seconds: float
    dev_kl_before: float | None = None
    dev_kl_after: float | None = None
    dev_top1_after: float | None = None
    kept: bool = True  # False: the phase made the dev KL worse and its weights were dropped


@dataclass
class HealResult:
    output: str
    plan: Plan
    phases: list[PhaseResult] = field(default_factory=list)
    seconds: float = 0.0  # training time over all phases (this run and any it resumed)
    dry_run: bool = False
    resumed: bool = False
    already_done: bool = False  # OUT already held this heal; nothing was trained
    evals: list[dict] = field(default_factory=list)  # dev-split scores against the teacher

    @property
    def final_losses(self) -> dict[str, float | None]:
        return {p.name: p.final_loss for p in self.phases}

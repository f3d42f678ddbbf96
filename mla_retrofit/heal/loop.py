"""The training loop of one heal phase: token-weighted accumulation, logging, checkpoints, interruption.

Every optimizer step weighs each token equally, whatever the number of targets
in each micro-batch and process: the loss of a micro-batch is its *sum* over
tokens divided by the step's total count (all micro-batches, all processes),
times the number of processes (data-parallel gradients are averaged).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .config import HealConfig
from .engine import Engine
from .losses import ce_targets
from .plan import PhasePlan, Plan
from .results import PhaseResult
from .state import MetricsLog, ResumeState, latest_checkpoint


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] long
    positions: torch.Tensor  # [B, T] long, restarting at every document start
    kd_mask: torch.Tensor  # [B, T] float: positions distilled (every position of the window)
    target: torch.Tensor  # [B, T] long: next token
    ce_mask: torch.Tensor  # [B, T] float: positions whose next token is a target


def make_batch(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> Batch:
    ids, positions = ids.long(), positions.long()
    target, keep = ce_targets(ids, mask, positions)
    return Batch(ids, positions, torch.ones(ids.shape, device=ids.device), target, keep.float())


@dataclass
class PhaseContext:
    """What every phase's loop works with, handed over explicitly by the recipe."""

    cfg: HealConfig
    plan: Plan
    engine: Engine
    loss: Callable  # (phase, student, wrapped, batch, counts) -> (loss, parts): the Objective's
    metrics: MetricsLog
    progress: Callable[[str, int, int, dict], None]
    ckpt_root: Path
    evaluate: Callable  # (state, student, label) -> DevScore: the fidelity gate's score, logged
    save: Callable  # (state, module, wrapped, optimizer, scheduler, sync) -> checkpoint path


class PhaseRun:
    """The training loop of one phase (steps, logging, checkpoints, interruption)."""

    def __init__(self, ctx: PhaseContext, phase: PhasePlan, state: ResumeState, student, module, wrapped,
                 optimizer, scheduler, params):
        self.ctx, self.phase, self.state = ctx, phase, state
        self.student, self.module, self.wrapped = student, module, wrapped
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.engine: Engine = ctx.engine
        self.saved_step = state.step
        self.updating = False
        self.loss: float | None = None

    def train(self, loader) -> ResumeState:
        self.wrapped.train()
        batches = iter(loader)
        try:
            while self.state.step < self.phase.steps:
                self.step(batches)
                if self._due(self.ctx.cfg.eval_every):
                    self.ctx.evaluate(self.state, self.student, f"{self.phase.name} step {self.state.step}")
                if self._due(self.ctx.cfg.save_every):
                    self.checkpoint()
        except KeyboardInterrupt:
            if not self.updating and self.state.step > self.saved_step and not self.engine.sharded:
                self.checkpoint(sync=False)  # sharded (FSDP) weights need every process: keep the last save
            raise
        return self.state

    def _due(self, every: int | None) -> bool:
        step = self.state.step
        return bool(every) and step % every == 0 and step < self.phase.steps

    def step(self, batches) -> None:
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        loss, extra = self.accumulate(batches)
        if not math.isfinite(loss):
            self.fail(f"loss is {loss}")
        norm = self.engine.clip(self.params, self.ctx.cfg.max_grad_norm)
        if not math.isfinite(norm):
            self.fail(f"gradient norm is {norm}")
        self.updating = True
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.sequences += self.ctx.plan.batch_size * self.ctx.plan.grad_accum * self.ctx.plan.world_size
        self.updating = False
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.state.seconds += seconds
        self.loss = loss
        self.log(loss, lr, norm, seconds, extra)

    def accumulate(self, batches) -> tuple[float, dict]:
        accum = self.ctx.plan.grad_accum
        micro = [make_batch(*self.engine.to_device(next(batches))) for _ in range(accum)]
        counts = self.engine.sum(torch.stack([
            sum(b.kd_mask.sum() for b in micro), sum(b.ce_mask.sum() for b in micro)]).float())
        scale = self.engine.num_processes
        total, extra = 0.0, {}
        for k, batch in enumerate(micro):
            sync = contextlib.nullcontext() if k == accum - 1 else self.engine.no_sync(self.wrapped)
            with sync:
                with self.engine.autocast():
                    loss, parts = self.ctx.loss(self.phase, self.student, self.wrapped, batch, counts)
                if self.phase.name == "imitate":  # a mean per micro-batch: average them
                    loss = loss / accum
                self.engine.backward(loss * scale)
            total = total + loss.detach().float()
            extra = {name: extra.get(name, 0.0) + value for name, value in parts.items()}
        reduced = self.engine.sum(torch.stack([total, *[torch.tensor(float(v)) for v in extra.values()]]))
        values = [float(v) for v in reduced]
        if self.phase.name == "imitate":
            values[0] /= scale
        return values[0], dict(zip(extra, values[1:]))

    def fail(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.ctx.ckpt_root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise UserError(f"{what} at phase {self.phase.index} ({self.phase.name}) step {self.state.step + 1}; "
                        f"stopped, {where}; lower --lr (and --resume) or check the data")

    def log(self, loss: float, lr: float, norm: float, seconds: float, extra: dict) -> None:
        plan = self.ctx.plan
        tokens = plan.batch_size * plan.grad_accum * plan.world_size * plan.seq_len
        metrics = {"loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / max(seconds, 1e-9), **extra}
        if self.state.step % self.ctx.cfg.log_every == 0 or self.state.step == self.phase.steps:
            self.ctx.metrics.write({"phase": self.phase.name, "phase_index": self.phase.index,
                                  "step": self.state.step, "tokens": self.state.step * tokens, **metrics})
        if self.engine.is_main:
            self.ctx.progress(self.phase.name, self.state.step, self.phase.steps, metrics)

    def checkpoint(self, sync: bool = True) -> None:
        self.ctx.save(self.state, self.module, self.wrapped, self.optimizer, self.scheduler, sync)
        self.saved_step = self.state.step

    def result(self, before: float | None, after, kept: bool) -> dict:
        return asdict(PhaseResult(
            name=self.phase.name, steps=self.phase.steps, tokens=self.phase.tokens, final_loss=self.loss,
            seconds=round(self._phase_seconds(), 1), dev_kl_before=before, dev_kl_after=after.kl,
            dev_top1_after=after.top1, kept=kept))

    def _phase_seconds(self) -> float:
        before = sum(r["seconds"] for r in self.state.results)
        return self.state.seconds - before


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``.

    Not transformers' ``get_cosine_schedule_with_warmup``: its warm-up starts at 0, so the first optimizer step
    of every phase (the whole warm-up when it is one step) would train with learning rate 0.
    """

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f

"""What each heal phase minimises on one micro-batch: phase 1 the per-layer imitation of the teacher's attention,
phases 2 and 3 KL to the teacher (plus cross-entropy and, optionally, residual matching).

:class:`Objective` gets its collaborators explicitly (the config, the teacher as a loader, the engine, the
calibration windows for the Fisher metric, the progress callback) and holds the one thing it computes once,
phase 1's metric factors.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import models
from .config import HealConfig
from .loop import Batch
from .losses import distill_sums, imitation_loss, residual_match_sum
from .models import causal_mask
from .plan import PhasePlan


class Objective:
    def __init__(self, cfg: HealConfig, teacher: Callable, engine, windows: Callable, progress: Callable):
        self.cfg, self.teacher, self.engine, self.windows, self.progress = cfg, teacher, engine, windows, progress
        self._metrics: list[torch.Tensor] | None = None  # phase 1 metric factors (imitate_metric fisher)

    def loss(self, phase: PhasePlan, student, wrapped, batch: Batch, counts: torch.Tensor):
        """The loss of one micro-batch, already divided by the step's token counts; and its parts for the log."""
        if phase.name == "imitate":
            return self.imitation(student, wrapped, batch), {}
        ce_weight = self.cfg.ce_weight if phase.name == "mla-only" else self.cfg.full_ce_weight
        teacher, teacher_hidden = self.teacher(), None
        match = self.cfg.hidden_weight > 0
        teacher_layers = models.LayerTap(teacher.model) if match else contextlib.nullcontext()
        if self.cfg.distill > 0 or match:
            with torch.no_grad(), teacher_layers:
                teacher_hidden = teacher.model(input_ids=batch.ids, position_ids=batch.positions,
                                               use_cache=False).last_hidden_state
        student_layers = models.LayerTap(student.model) if match else contextlib.nullcontext()
        with models.HiddenTap(student.model) as tap, student_layers:  # through the wrapper, one logit position only
            wrapped(input_ids=batch.ids, position_ids=batch.positions, use_cache=False, logits_to_keep=1)
        sums = distill_sums(tap.hidden, student.lm_head, teacher_hidden if self.cfg.distill > 0 else None,
                            teacher.lm_head, batch.kd_mask, batch.target, batch.ce_mask if ce_weight > 0 else None,
                            self.cfg.loss_chunk)
        kl = sums.kl / counts[0].clamp_min(1.0)
        ce = sums.ce / counts[1].clamp_min(1.0)
        loss = self.cfg.distill * kl + ce_weight * ce
        parts = {"kl": float(kl.detach())}
        if ce_weight > 0:
            parts["ce"] = float(ce.detach())
        if match:
            hid = residual_match_sum(student_layers.states, teacher_layers.states, batch.kd_mask)
            hid = hid / counts[0].clamp_min(1.0)
            loss = loss + self.cfg.hidden_weight * hid
            parts["hidden"] = float(hid.detach())
        return loss, parts

    def imitation(self, student, wrapped, batch: Batch) -> torch.Tensor:
        inputs, targets = models.teacher_attention(self.teacher(), student, batch.ids, batch.positions)
        position_embeddings = student.model.rotary_emb(inputs[0], batch.positions)
        mask = causal_mask(student.config, inputs[0], batch.positions)
        return imitation_loss(wrapped(inputs, position_embeddings, mask), targets, self.imitation_metrics())

    def imitation_metrics(self) -> list[torch.Tensor] | None:
        """Phase 1's per-layer metric factors (``imitate_metric fisher``), estimated once on the first windows."""
        if self.cfg.imitate_metric != "fisher":
            return None
        if self._metrics is None:
            cfg, device = self.cfg, self.engine.device
            ids, positions = self.windows()
            n = min(cfg.fisher_windows, ids.shape[0])

            def report(done: int, total: int) -> None:
                if self.engine.is_main:
                    self.progress("fisher", done, total, {})

            factors = models.attention_fisher(self.teacher(), ids[:n].to(device).long(),
                                              positions[:n].to(device).long(), cfg.fisher_ridge, cfg.seed, report)
            self._metrics = [f.to(device) for f in factors]
        return self._metrics

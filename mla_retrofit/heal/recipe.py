"""The heal recipe: layerwise imitation, MLA-only fine-tune, full fine-tune, with checkpoints and resume.

:func:`heal` is the entry point. :class:`HealRecipe` has one named step per
stage (plan, prepare the output, load data, train a phase, checkpoint, write
the healed model); :meth:`HealRecipe.train_phase` is the training loop.

Phase 1 (``imitate``): the teacher runs once per batch; hooks record each
layer's attention input (``input_layernorm`` output) and output; the MLA
attention of the same layer gets the same input and is trained to match
(loss: per-layer MSE over the target's mean square, summed over layers).
Phase 2 (``mla-only``): ``distill`` x KL(teacher || student) on every position
(the teacher runs on the fly) plus ``ce_weight`` x next-token loss on the
target tokens; only MLA parameters train.
Phase 3 (``full``): the same objective (``full_ce_weight``), every parameter
but the embeddings and the output head trains, lr scaled by ``full_lr_scale``.

The fidelity gate (``gate``) scores the student against the teacher on a dev
split held out of the training text, before training and after every phase;
a phase that ends worse than the best so far is dropped (its end checkpoint
holds the weights it started from) unless ``keep_last``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..data import TEACHER_SAMPLES, heal_records
from ..errors import UserError
from ..sources import load_tokenizer
from .. import sampling as samples
from . import models
from .config import HealConfig
from .data import HealWindows
from .engine import Engine, make_engine, rng_state, seed_everything, set_rng_state
from .gate import DevScore, dev_score
from .loop import PhaseContext, PhaseRun, lr_lambda
from .output import heal_record, place_output, saved_dtype
from .models import causal_mask
from .objective import Objective
from .plan import PhasePlan, Plan, make_plan
from .refit import refit_output_projections
from .results import HealResult, PhaseResult
from .state import (Checkpoint, CheckpointError, MetricsLog, ResumeState, latest_checkpoint, load_part, read_state,
                    save_checkpoint)

__all__ = ["HealRecipe", "HealResult", "PhaseResult", "heal", "lr_lambda"]

Progress = Callable[[str, int, int, dict], None]


def heal(cfg: HealConfig, progress: Progress | None = None) -> HealResult:
    """Heal the converted model ``cfg.model`` into ``cfg.output`` (or only plan it with ``dry_run``)."""
    return HealRecipe(cfg, progress).run()


class HealRecipe:
    """One heal run over explicit collaborators: the engine (where it trains), the plan (steps per phase), the
    data (:class:`HealWindows`), the teacher (loaded once, dropped after the last phase), the objective (what a
    phase minimises), the metrics log and the checkpoints under ``OUT/checkpoints``. ``run`` makes them in order;
    until then they are None."""

    def __init__(self, cfg: HealConfig, progress: Progress | None = None):
        self.cfg = cfg.resolved()
        self.progress = progress or (lambda phase, step, total, metrics: None)
        self.out = Path(self.cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.engine: Engine | None = None
        self.plan: Plan | None = None
        self.tokenizer = None
        self.data: HealWindows | None = None
        self.metrics: MetricsLog | None = None
        self.objective: Objective | None = None
        self._teacher = None

    # -- setup ------------------------------------------------------------------------------------
    def make_plan(self, world_size: int) -> Plan:
        """The plan; the teacher is always needed (imitation, distillation and the fidelity gate)."""
        cfg = self.cfg
        params = models.param_counts(cfg.model)
        return make_plan(cfg, world_size, params, models.resolve_teacher(cfg.model, cfg.teacher))

    def run(self) -> HealResult:
        if self.cfg.dry_run:
            plan = self.make_plan(int(os.environ.get("WORLD_SIZE", "1")))
            return HealResult(output=str(self.out), plan=plan, dry_run=True)
        self.engine = make_engine(self.cfg.precision)
        self.plan = self.make_plan(self.engine.num_processes)
        done = self.finished_result()
        if done is not None:
            return done
        self.tokenizer = load_tokenizer(self.cfg.model)
        records = None if self.cfg.data == TEACHER_SAMPLES else self.records()  # bad data fails before OUT exists
        state = self.prepare_output()
        cfg = self.cfg
        self.data = HealWindows.build(records if records is not None else self.records(), self.tokenizer,
                                      cfg.seq_len, self.plan.total_sequences, cfg.dev_fraction, cfg.dev_windows,
                                      cfg.seed)
        self.objective = Objective(cfg, self.teacher, self.engine, lambda: (self.data.ids, self.data.positions),
                                   self.progress)
        resumed = state.phase > 0
        if not state.evals:
            self.evaluate(state, models.load_student(self.cfg.model).to(self.engine.device), "input")
        if self.cfg.refit and state.phase == 0 and "0" not in state.phase_ends:
            state = self.refit(state)
        for phase in self.plan.phases:
            if not state.phase_finished(phase.index):
                state = self.train_phase(phase, state)
        self._teacher = None  # no phase needs it any more
        result = self.write_output(state)
        result.resumed = resumed
        return result

    # -- data -------------------------------------------------------------------------------------
    def records(self) -> list:
        cfg = self.cfg
        if cfg.data != TEACHER_SAMPLES:
            return heal_records(cfg.data, cfg.max_rows, cfg.seed)
        path = self.out / "data" / "teacher-samples.jsonl"
        wanted = samples.settings(cfg.samples, cfg.sample_tokens, cfg.seed, cfg.sample_top_p, self.plan.teacher,
                                  self.engine.precision)
        texts = samples.read_cached(path, wanted)
        if texts is None:
            if self.engine.is_main:
                report = lambda done, total: self.progress("samples", done, total, {})  # noqa: E731
                with self.engine.autocast():
                    texts = samples.sample(self.teacher(), self.tokenizer, cfg.samples, cfg.sample_tokens, cfg.seed,
                                           cfg.sample_top_p, progress=report)
                samples.write(path, wanted, texts)
            self.engine.wait()
            texts = samples.read_cached(path, wanted)
        return texts

    # -- the fidelity gate ------------------------------------------------------------------------
    def evaluate(self, state: ResumeState, student, label: str) -> DevScore:
        """Score ``student`` on the dev split, log it (metrics.jsonl, progress line) and keep it in ``state``."""
        score = dev_score(student, self.teacher(), self.data.dev_ids, self.data.dev_positions, self.cfg.batch_size,
                          self.cfg.loss_chunk)
        record = {"after": label, "phase_index": state.phase, "step": state.step, **score.as_dict()}
        state.evals.append(record)
        self.metrics.write({"eval": label, "phase_index": state.phase, "step": state.step,
                            "dev_kl": score.kl, "dev_top1": score.top1})
        if self.engine.is_main:
            self.progress("dev", 0, 0, {"after": label, "dev_kl": score.kl, "dev_top1": score.top1})
        return score

    def best_kl(self, state: ResumeState) -> float:
        """The dev KL of the weights a phase starts from (the input, or the last kept phase)."""
        kept = [r["dev_kl_after"] for r in state.results if r.get("kept", True) and r.get("dev_kl_after") is not None]
        return kept[-1] if kept else state.evals[0]["kl"]

    def finished_result(self) -> HealResult | None:
        """A result for an OUT that already holds this heal (same settings); an error for other settings."""
        record = self.out / "conversion.json"
        if self.cfg.overwrite or not record.is_file():
            return None
        done = json.loads(record.read_text()).get("heal")
        if done is None:
            return None
        diff = self.cfg.mismatches(done["config"])
        if diff:
            raise UserError(f"{self.out} already holds a healed model made with other settings ({', '.join(diff)}); "
                            "pass --overwrite to heal again")
        phases = [PhaseResult(**p) for p in done["phases"]]
        return HealResult(output=str(self.out), plan=self.plan, phases=phases, seconds=done["seconds"],
                          already_done=True, evals=done.get("dev", []))

    def prepare_output(self) -> ResumeState:
        """Clear, create or reopen OUT; the state to start from (a fresh one unless resuming)."""
        cfg, engine = self.cfg, self.engine
        latest = self._latest(required=cfg.resume)
        if engine.is_main:
            self._check_output(latest)
        engine.wait()
        latest = self._latest(required=True) if cfg.resume else None
        state = read_state(latest) if latest else ResumeState(world_size=engine.num_processes)
        if latest:
            self._check_resume(state)
        state.config = cfg.as_dict()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", engine.is_main)
        if engine.is_main:
            self.metrics.truncate(state)
            (self.out / "heal_config.json").write_text(json.dumps(cfg.as_dict(), indent=2))
        return state

    def _latest(self, required: bool) -> Path | None:
        """The latest checkpoint; an unreadable one is an error when resuming (never a silent restart)."""
        try:
            return latest_checkpoint(self.ckpt_root)
        except CheckpointError as e:
            if not required:
                return None
            raise UserError(f"cannot resume: {e}; pass --overwrite to start over") from e

    def _check_output(self, latest: Path | None) -> None:
        cfg, out = self.cfg, self.out
        busy = out.exists() and any(out.iterdir())
        if busy and cfg.overwrite:
            shutil.rmtree(out)
        elif busy and not cfg.resume:
            hint = "pass --resume to continue it or " if latest else ""
            raise UserError(f"output directory {out} already exists and is not empty; {hint}pass --overwrite to start over")
        out.mkdir(parents=True, exist_ok=True)

    def _check_resume(self, state: ResumeState) -> None:
        diff = self.cfg.mismatches(state.config)
        if diff:
            changes = ", ".join(f"{k}: {state.config[k]!r} -> {self.cfg.as_dict()[k]!r}" for k in diff)
            raise UserError(f"cannot resume {self.out}: settings differ from the interrupted run ({changes}); "
                            "use the same settings or pass --overwrite to start over")
        if state.world_size != self.engine.num_processes:
            raise UserError(f"cannot resume {self.out}: it ran on {state.world_size} process(es), now "
                            f"{self.engine.num_processes}; launch with the same number")

    # -- models -----------------------------------------------------------------------------------
    def teacher(self):
        if self._teacher is None:
            device = self.engine.device
            dtype = torch.bfloat16 if self.engine.precision == "bf16" else torch.float32
            self._teacher = models.load_teacher(self.plan.teacher, dtype).to(device)
        return self._teacher

    def student(self, checkpoint: str | None):
        """A fresh float32 student with the weights of checkpoint directory ``checkpoint`` (None: the input)."""
        model = models.load_student(self.cfg.model)
        if checkpoint is not None:
            try:
                weights = load_part(self.ckpt_root / checkpoint, "weights")
            except CheckpointError as e:
                raise UserError(f"{e}; pass --overwrite to start over") from e
            unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
            if unexpected:
                raise UserError(f"checkpoint {checkpoint} does not match {self.cfg.model} ({unexpected[0]}, ...)")
        return model

    def phase_module(self, phase: PhasePlan, student):
        if phase.name == "imitate":
            teacher = self.teacher()
            if len(teacher.model.layers) != len(student.model.layers):
                raise UserError(f"the teacher {self.plan.teacher} has {len(teacher.model.layers)} layers, the "
                                f"converted model {len(student.model.layers)}; pass the right --teacher")
            # the engine places only the trained stack; the rest of the student runs at the phase's evaluation,
            # so it goes to the same device (on a GPU a half-moved student failed there)
            student.to(self.engine.device)
            return models.AttentionStack(student, self.cfg.gradient_checkpointing)
        if self.cfg.gradient_checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return student

    def loader(self, phase: PhasePlan, start_step: int) -> DataLoader:
        """The phase's windows from ``start_step`` on: a resumed run slices the packed tensor at its offset
        (what ``accelerate.skip_first_batches`` would reach by iterating the skipped batches)."""
        per_step = self.plan.batch_size * self.plan.grad_accum * self.plan.world_size
        first = phase.first_sequence + start_step * per_step
        end = phase.first_sequence + phase.sequences
        d = self.data
        data = TensorDataset(d.ids[first:end], d.positions[first:end], d.mask[first:end])
        return DataLoader(data, batch_size=self.plan.batch_size, shuffle=False)

    # -- training ---------------------------------------------------------------------------------
    def refit(self, state: ResumeState) -> ResumeState:
        """Phase 0: the closed-form refit of every ``o_proj`` (``refit``), gated like a phase."""
        cfg, device, t0 = self.cfg, self.engine.device, time.perf_counter()
        student = models.load_student(cfg.model).to(device).eval()
        n = min(cfg.refit_windows, self.data.ids.shape[0])
        ids, pos = self.data.ids[:n].to(device).long(), self.data.positions[:n].to(device).long()
        mask = causal_mask(student.config, student.model.embed_tokens(ids), pos)
        report = lambda done, total: self.progress("refit", done, total, {}) if self.engine.is_main else None  # noqa: E731
        errors = refit_output_projections(student, self.teacher(), ids, pos, mask, cfg.refit_ridge, report)
        state.seconds += time.perf_counter() - t0
        before = self.best_kl(state)
        score = self.evaluate(state, student, "refit")
        kept = score.kl <= before or cfg.keep_last
        state.phase_done = True
        state.results.append(asdict(PhaseResult(
            name="refit", steps=0, tokens=int(ids.numel()), final_loss=sum(errors) / len(errors),
            seconds=round(time.perf_counter() - t0, 1), dev_kl_before=before, dev_kl_after=score.kl,
            dev_top1_after=score.top1, kept=kept)))
        self.save(state, student if kept else models.load_student(cfg.model))
        return state

    def train_phase(self, phase: PhasePlan, state: ResumeState) -> ResumeState:
        engine, cfg = self.engine, self.cfg
        start = state.start_step(phase.index)
        origin = self.origin(state, phase)
        student = self.student(state.checkpoint if start else origin)
        module = self.phase_module(phase, student)
        params = models.set_trainable(module, phase.name)
        # fused: one kernel for all parameters (CPU and CUDA); 0.08 s against 0.37 s per step for 106M parameters
        # on this project's CPU. Not under FSDP, whose sharded parameters go through the default implementation.
        optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=cfg.weight_decay, fused=not engine.sharded)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(phase.warmup_steps, phase.steps))
        wrapped, optimizer, loader = engine.prepare(module, optimizer, self.loader(phase, start))
        params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP replaces the parameters
        if start:
            self._restore(state, wrapped, optimizer, scheduler)
        else:
            seed_everything(cfg.seed + phase.index)
        state = ResumeState(**{**asdict(state), "phase": phase.index, "step": start, "phase_done": False})
        ctx = PhaseContext(cfg, self.plan, engine, self.objective.loss, self.metrics, self.progress, self.ckpt_root,
                           self.evaluate, self.save)
        run = PhaseRun(ctx, phase, state, student, module, wrapped, optimizer, scheduler, params)
        state = run.train(loader)
        engine.release()
        return self.finish_phase(run, origin)

    def origin(self, state: ResumeState, phase: PhasePlan) -> str | None:
        """The checkpoint a phase starts from: the end of the phase before it (None: the input model)."""
        earlier = [int(k) for k in state.phase_ends if int(k) < phase.index]
        return state.phase_ends[str(max(earlier))] if earlier else None

    def finish_phase(self, run: PhaseRun, origin: str | None) -> ResumeState:
        """The gate: score the phase's end; keep it, or end the phase on the weights it started from."""
        state, phase = run.state, run.phase
        before = self.best_kl(state)
        score = self.evaluate(state, run.student, f"phase {phase.index} ({phase.name})")
        kept = score.kl <= before or self.cfg.keep_last
        state.phase_done = True
        state.results.append(run.result(before, score, kept))
        if kept:
            self.save(state, run.module, run.wrapped)
        else:
            self.save(state, self.student(origin))
            self.metrics.write({"eval": f"phase {phase.index} dropped", "dev_kl": score.kl, "best_dev_kl": before})
        return state

    def _restore(self, state: ResumeState, wrapped, optimizer, scheduler) -> None:
        path = self.ckpt_root / state.checkpoint
        try:
            self.engine.load_optimizer_state(wrapped, optimizer, load_part(path, "optimizer"))
            scheduler.load_state_dict(load_part(path, "scheduler"))
            set_rng_state(load_part(path, "rng", trusted=True))
        except CheckpointError as e:
            raise UserError(f"cannot resume: {e}; pass --overwrite to start over") from e

    # -- checkpoints and output ------------------------------------------------------------------
    def save(self, state: ResumeState, module, wrapped=None, optimizer=None, scheduler=None,
             sync: bool = True) -> Path | None:
        """Checkpoint ``state``; with an optimizer (inside a phase) also its, the scheduler's and RNG state.

        ``sync=False`` (on Ctrl-C) skips the final barrier: other processes may be anywhere.
        """
        engine = self.engine
        weights = engine.model_state(wrapped if wrapped is not None else module)
        if state.phase < 3:
            weights = {k: v for k, v in weights.items() if models.is_attention(k)}
        ckpt = Checkpoint(state=state, weights=weights)
        if optimizer is not None:
            ckpt.optimizer = engine.optimizer_state(wrapped, optimizer)
            ckpt.scheduler, ckpt.rng = scheduler.state_dict(), rng_state()
        path = save_checkpoint(self.ckpt_root, ckpt, self.cfg.keep_checkpoints) if engine.is_main else None
        if sync:
            engine.wait()
        return path

    def write_output(self, state: ResumeState) -> HealResult:
        phases = [PhaseResult(**r) for r in state.results]
        result = HealResult(output=str(self.out), plan=self.plan, phases=phases, seconds=state.seconds,
                            evals=list(state.evals))
        if self.engine.is_main:
            model = self.student(state.checkpoint or None)
            model.to(saved_dtype(self.cfg.model))
            place_output(self.cfg, model, self.tokenizer, heal_record(self.cfg, result, self.data), self.ckpt_root)
        self.engine.wait()
        return result

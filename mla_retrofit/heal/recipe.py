"""The heal recipe: layerwise imitation, MLA-only fine-tune, full fine-tune, with checkpoints and resume.

:func:`heal` is the entry point. :class:`HealRecipe` has one named step per
stage (plan, prepare the output, load data, train a phase, checkpoint, write
the healed model); :meth:`HealRecipe.train_phase` is the training loop.

Phase 1 (``imitate``): the teacher runs once per batch; hooks record each
layer's attention input (``input_layernorm`` output) and output; the MLA
attention of the same layer gets the same input and is trained to match
(loss: per-layer MSE over the target's mean square, summed over layers).
Phase 2 (``mla-only``): next-token loss on the answer tokens (plus
``distill`` x KL to the teacher's logits), only MLA parameters train.
Phase 3 (``full``): every parameter trains, lr scaled by ``full_lr_scale``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .. import __version__
from ..checkpoint import save_mla_model
from ..data import chat_records
from ..errors import UserError
from . import models
from .config import HealConfig
from .data import PackedStream
from .engine import Engine, make_engine, rng_state, seed_everything, set_rng_state
from .losses import distill_loss, imitation_loss, next_token_loss
from .plan import PhasePlan, Plan, make_plan
from .state import (Checkpoint, MetricsLog, ResumeState, checkpoint_name, latest_checkpoint, load_part, read_state,
                    save_checkpoint)

Progress = Callable[[str, int, int, dict], None]


@dataclass
class PhaseResult:
    name: str
    steps: int
    tokens: int
    final_loss: float | None
    seconds: float


@dataclass
class HealResult:
    output: str
    plan: Plan
    phases: list[PhaseResult] = field(default_factory=list)
    seconds: float = 0.0  # training time over all phases (this run and any it resumed)
    dry_run: bool = False
    resumed: bool = False
    already_done: bool = False  # OUT already held this heal; nothing was trained

    @property
    def final_losses(self) -> dict[str, float | None]:
        return {p.name: p.final_loss for p in self.phases}


def heal(cfg: HealConfig, progress: Progress | None = None) -> HealResult:
    """Heal the converted model ``cfg.model`` into ``cfg.output`` (or only plan it with ``dry_run``)."""
    return HealRecipe(cfg, progress).run()


class HealRecipe:
    def __init__(self, cfg: HealConfig, progress: Progress | None = None):
        self.cfg = cfg.resolved()
        self.progress = progress or (lambda phase, step, total, metrics: None)
        self.out = Path(self.cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self._teacher = None

    # -- setup ------------------------------------------------------------------------------------
    def needs_teacher(self) -> bool:
        split = self.cfg.split
        return split[0] > 0 or (split[1] > 0 and self.cfg.distill > 0)

    def make_plan(self, world_size: int) -> Plan:
        cfg = self.cfg
        params = models.param_counts(cfg.model)
        teacher = models.resolve_teacher(cfg.model, cfg.teacher) if self.needs_teacher() else None
        return make_plan(cfg, world_size, params, teacher)

    def run(self) -> HealResult:
        if self.cfg.dry_run:
            plan = self.make_plan(int(os.environ.get("WORLD_SIZE", "1")))
            return HealResult(output=str(self.out), plan=plan, dry_run=True)
        self.engine = make_engine(self.cfg.engine)
        self.plan = self.make_plan(self.engine.num_processes)
        done = self.finished_result()
        if done is not None:
            return done
        self.tokenizer = models.load_tokenizer(self.cfg.model)
        stream = PackedStream(chat_records(self.cfg.data), self.tokenizer, self.cfg.seq_len, self.cfg.seed)
        self.ids, self.mask = stream.take(self.plan.total_sequences)
        self.mask_mode = stream.mode
        state = self.prepare_output()
        resumed = state.phase > 0
        for phase in self.plan.phases:
            if not state.phase_finished(phase.index):
                state = self.train_phase(phase, state)
        result = self.write_output(state)
        result.resumed = resumed
        return result

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
                          already_done=True)

    def prepare_output(self) -> ResumeState:
        """Clear, create or reopen OUT; the state to start from (a fresh one unless resuming)."""
        cfg, engine = self.cfg, self.engine
        latest = latest_checkpoint(self.ckpt_root)
        if engine.is_main:
            self._check_output(latest)
        engine.wait()
        latest = latest_checkpoint(self.ckpt_root) if cfg.resume else None
        state = read_state(latest) if latest else ResumeState(world_size=engine.num_processes)
        if latest:
            self._check_resume(state)
        state.config = cfg.as_dict()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", engine.is_main)
        if engine.is_main:
            self.metrics.truncate(state)
            (self.out / "heal_config.json").write_text(json.dumps(cfg.as_dict(), indent=2))
        return state

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
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self._teacher = models.load_teacher(self.plan.teacher, dtype).to(device)
        return self._teacher

    def student(self, state: ResumeState):
        """A fresh float32 student with the weights of the latest checkpoint (if any)."""
        model = models.load_student(self.cfg.model)
        if state.phase > 0:
            weights = load_part(self.ckpt_root / checkpoint_name(state), "weights")
            unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
            if unexpected:
                raise UserError(f"checkpoint {checkpoint_name(state)} does not match {self.cfg.model} ({unexpected[0]}, ...)")
        return model

    def phase_module(self, phase: PhasePlan, student):
        if phase.name == "imitate":
            teacher = self.teacher()
            if len(teacher.model.layers) != len(student.model.layers):
                raise UserError(f"the teacher {self.plan.teacher} has {len(teacher.model.layers)} layers, the "
                                f"converted model {len(student.model.layers)}; pass the right --teacher")
            return models.AttentionStack(student, self.cfg.gradient_checkpointing)
        if self.cfg.gradient_checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return student

    def loader(self, phase: PhasePlan, start_step: int) -> DataLoader:
        per_step = self.plan.batch_size * self.plan.grad_accum * self.plan.world_size
        first = phase.first_sequence + start_step * per_step
        end = phase.first_sequence + phase.sequences
        data = TensorDataset(self.ids[first:end], self.mask[first:end])
        return DataLoader(data, batch_size=self.plan.batch_size, shuffle=False)

    # -- training ---------------------------------------------------------------------------------
    def train_phase(self, phase: PhasePlan, state: ResumeState) -> ResumeState:
        engine, cfg = self.engine, self.cfg
        start = state.start_step(phase.index)
        student = self.student(state)
        module = self.phase_module(phase, student)
        params = models.set_trainable(module, phase.name)
        optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(phase.warmup_steps, phase.steps))
        wrapped, optimizer, loader = engine.prepare(module, optimizer, self.loader(phase, start))
        params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP replaces the parameters
        if start:
            self._restore(state, wrapped, optimizer, scheduler)
        else:
            seed_everything(cfg.seed + phase.index)
        state = ResumeState(**{**asdict(state), "phase": phase.index, "step": start, "phase_done": False})
        run = PhaseRun(self, phase, state, student, module, wrapped, optimizer, scheduler, params)
        state = run.train(loader)
        engine.release()
        if phase.name == "imitate" and not (self.plan.phase("mla-only") and self.cfg.distill > 0):
            self._teacher = None  # not needed any more
        return state

    def _restore(self, state: ResumeState, wrapped, optimizer, scheduler) -> None:
        path = self.ckpt_root / checkpoint_name(state)
        self.engine.load_optimizer_state(wrapped, optimizer, load_part(path, "optimizer"))
        scheduler.load_state_dict(load_part(path, "scheduler"))
        set_rng_state(load_part(path, "rng", trusted=True))

    def phase_loss(self, phase: PhasePlan, student, wrapped, ids, mask) -> tuple[torch.Tensor, dict]:
        if phase.name == "imitate":
            return self.imitation_loss(student, wrapped, ids), {}
        logits = wrapped(input_ids=ids, use_cache=False).logits
        loss = next_token_loss(logits, ids, mask)
        if phase.name != "mla-only" or self.cfg.distill <= 0:
            return loss, {}
        with torch.no_grad():
            teacher_logits = self.teacher()(input_ids=ids, use_cache=False).logits
        kl = distill_loss(logits, teacher_logits, ids, mask)
        return loss + self.cfg.distill * kl, {"ce": float(loss.detach()), "kl": float(kl.detach())}

    def imitation_loss(self, student, wrapped, ids: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher()
        with torch.no_grad(), models.TeacherTap(teacher) as tap:
            teacher.model(input_ids=ids, use_cache=False)
        inputs = [x.detach() for x in tap.inputs]
        targets = [y.detach() for y in tap.outputs]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        position_embeddings = student.model.rotary_emb(inputs[0], positions)
        mask = causal_mask(student.config, inputs[0], positions)
        return imitation_loss(wrapped(inputs, position_embeddings, mask), targets)

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
        result = HealResult(output=str(self.out), plan=self.plan, phases=phases, seconds=state.seconds)
        if self.engine.is_main:
            model = self.student(state)
            model.to(_saved_dtype(self.cfg.model))
            self._place_output(model, self.heal_record(result))
        self.engine.wait()
        return result

    def heal_record(self, result: HealResult) -> dict:
        return {
            "mla_retrofit_version": __version__,
            "teacher": self.plan.teacher,
            "data": self.cfg.data,
            "mask_mode": self.mask_mode,
            "phases": [asdict(p) for p in result.phases],
            "steps": self.plan.total_steps,
            "tokens": self.plan.total_tokens,
            "final_losses": result.final_losses,
            "seconds": round(result.seconds, 1),
            "world_size": self.plan.world_size,
            "config": self.cfg.as_dict(),
        }

    def _place_output(self, model, heal: dict) -> None:
        """Save the healed model next to the run's files; ``conversion.json`` (the completion marker) goes last."""
        src = Path(self.cfg.model)
        record = json.loads((src / "conversion.json").read_text()) if (src / "conversion.json").is_file() else {}
        record["heal"] = heal
        tmp = self.out / f".final-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        save_mla_model(model, tmp, self.tokenizer, {"README.md": _model_card(src, heal)})
        for path in sorted(tmp.iterdir()):
            os.replace(path, self.out / path.name)
        tmp.rmdir()
        marker = self.out / ".conversion.json.tmp"
        marker.write_text(json.dumps(record, indent=2))
        os.replace(marker, self.out / "conversion.json")
        if self.cfg.cleanup:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)


class PhaseRun:
    """The training loop of one phase (steps, logging, checkpoints, interruption)."""

    def __init__(self, recipe: HealRecipe, phase: PhasePlan, state: ResumeState, student, module, wrapped,
                 optimizer, scheduler, params):
        self.r, self.phase, self.state = recipe, phase, state
        self.student, self.module, self.wrapped = student, module, wrapped
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.engine: Engine = recipe.engine
        self.saved_step = state.step
        self.updating = False
        self.loss: float | None = None

    def train(self, loader) -> ResumeState:
        self.wrapped.train()
        batches = iter(loader)
        try:
            while self.state.step < self.phase.steps:
                self.step(batches)
                if self._due():
                    self.checkpoint()
        except KeyboardInterrupt:
            if not self.updating and self.state.step > self.saved_step and not self.engine.sharded:
                self.checkpoint(sync=False)  # sharded (FSDP) weights need every process: keep the last save
            raise
        return self.finish()

    def _due(self) -> bool:
        every, step = self.r.cfg.save_every, self.state.step
        return bool(every) and step % every == 0 and step < self.phase.steps

    def step(self, batches) -> None:
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        loss, extra = self.accumulate(batches)
        if not math.isfinite(loss):
            self.fail(f"loss is {loss}")
        norm = self.engine.clip(self.params, self.r.cfg.max_grad_norm)
        if not math.isfinite(norm):
            self.fail(f"gradient norm is {norm}")
        self.updating = True
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.sequences += self.r.plan.batch_size * self.r.plan.grad_accum * self.r.plan.world_size
        self.updating = False
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.state.seconds += seconds
        self.loss = loss
        self.log(loss, lr, norm, seconds, extra)

    def accumulate(self, batches) -> tuple[float, dict]:
        accum, total, extra = self.r.plan.grad_accum, 0.0, {}
        for k in range(accum):
            ids, mask = self.engine.to_device(next(batches))
            ids = ids.long()
            sync = contextlib.nullcontext() if k == accum - 1 else self.engine.no_sync(self.wrapped)
            with sync:
                with self.engine.autocast():
                    loss, parts = self.r.phase_loss(self.phase, self.student, self.wrapped, ids, mask)
                self.engine.backward(loss / accum)
            total = total + loss.detach().float()
            extra = {name: extra.get(name, 0.0) + value / accum for name, value in parts.items()}
        return self.engine.mean(total / accum), extra

    def fail(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.r.ckpt_root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise UserError(f"{what} at phase {self.phase.index} ({self.phase.name}) step {self.state.step + 1}; "
                        f"stopped, {where}; lower --lr (and --resume) or check the data")

    def log(self, loss: float, lr: float, norm: float, seconds: float, extra: dict) -> None:
        plan = self.r.plan
        tokens = plan.batch_size * plan.grad_accum * plan.world_size * plan.seq_len
        metrics = {"loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / max(seconds, 1e-9), **extra}
        if self.state.step % self.r.cfg.log_every == 0 or self.state.step == self.phase.steps:
            self.r.metrics.write({"phase": self.phase.name, "phase_index": self.phase.index,
                                  "step": self.state.step, "tokens": self.state.step * tokens, **metrics})
        if self.engine.is_main:
            self.r.progress(self.phase.name, self.state.step, self.phase.steps, metrics)

    def checkpoint(self, sync: bool = True) -> None:
        self.r.save(self.state, self.module, self.wrapped, self.optimizer, self.scheduler, sync)
        self.saved_step = self.state.step

    def finish(self) -> ResumeState:
        self.state.phase_done = True
        self.state.results.append(asdict(PhaseResult(
            name=self.phase.name, steps=self.phase.steps, tokens=self.phase.tokens, final_loss=self.loss,
            seconds=round(self._phase_seconds(), 1))))
        self.r.save(self.state, self.module, self.wrapped)
        return self.state

    def _phase_seconds(self) -> float:
        before = sum(r["seconds"] for r in self.state.results)
        return self.state.seconds - before


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def causal_mask(config, x: torch.Tensor, positions: torch.Tensor):
    """The mask the student's full forward would build for an unpadded batch (None: plain causal SDPA)."""
    fn = create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    return fn(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)


def _saved_dtype(model_dir: str) -> torch.dtype:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _model_card(src: Path, heal: dict) -> str:
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else f"# MLA retrofit of {src}\n"
    phases = ", ".join(f"{p['name']} {p['steps']} steps (loss {p['final_loss']:.4g})" for p in heal["phases"]
                       if p["final_loss"] is not None)
    return card + (f"\n## Healing\n\nHealed with mla-retrofit {heal['mla_retrofit_version']} on `{heal['data']}` "
                   f"({heal['tokens']:,} tokens): {phases}.\n`conversion.json` key `heal` holds the settings.\n")

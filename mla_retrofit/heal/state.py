"""Checkpoints of a heal run and the small resume state saved with each.

``OUT/checkpoints/<phaseP-stepS>/`` holds

* ``state.json``: :class:`ResumeState` (phase, step, data position, resolved config, finished phases);
* ``weights.pt``: the weights changed so far (the MLA attentions; every weight once phase 3 runs);
* ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: only inside a phase (a new phase starts a new optimizer).

A checkpoint is written into a temporary directory and renamed to a name no
other checkpoint has (``phaseP-stepS[-end]-<id>``); ``OUT/checkpoints/latest``
(replaced atomically) then names it, and only then are older checkpoints
removed: at every instant ``latest`` names a complete checkpoint. Mid-phase
checkpoints beyond ``keep`` go; phase-end checkpoints (``-end``) stay until the
healed model is written, since the fidelity gate may return to one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import faults

LATEST = "latest"


@dataclass
class ResumeState:
    phase: int = 0  # index (1..3) of the phase this checkpoint belongs to; 0: nothing trained yet
    step: int = 0  # optimizer steps completed in that phase
    phase_done: bool = False
    sequences: int = 0  # packed sequences consumed by the whole run (all processes)
    world_size: int = 1
    seconds: float = 0.0  # training time so far
    config: dict = field(default_factory=dict)  # the resolved HealConfig
    results: list[dict] = field(default_factory=list)  # one PhaseResult per finished phase
    evals: list[dict] = field(default_factory=list)  # dev-split scores: the input, then every eval point
    phase_ends: dict = field(default_factory=dict)  # phase index (str) -> its end checkpoint's directory name
    checkpoint: str = ""  # the directory name of the checkpoint this state was saved in

    def phase_finished(self, index: int) -> bool:
        return index < self.phase or (index == self.phase and self.phase_done)

    def start_step(self, index: int) -> int:
        return self.step if index == self.phase and not self.phase_done else 0


@dataclass
class Checkpoint:
    state: ResumeState
    weights: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None


class CheckpointError(Exception):
    """A checkpoint exists but cannot be read."""


def checkpoint_name(state: ResumeState) -> str:
    end = "-end" if state.phase_done else ""
    return f"phase{state.phase}-step{state.step:07d}{end}-{uuid.uuid4().hex[:6]}"


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write ``ckpt`` under ``root`` atomically, point ``latest`` at it, drop the oldest beyond ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(ckpt.state)
    ckpt.state.checkpoint = final.name
    if ckpt.state.phase_done:
        ckpt.state.phase_ends[str(ckpt.state.phase)] = final.name
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps(asdict(ckpt.state), indent=2))
    for name in ("weights", "optimizer", "scheduler", "rng"):
        if getattr(ckpt, name) is not None:
            torch.save(getattr(ckpt, name), tmp / f"{name}.pt")
            faults.point("heal.checkpoint.part")
    tmp.rename(final)
    faults.point("heal.checkpoint.written")
    pointer = root / f".{LATEST}-{uuid.uuid4().hex[:6]}"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    faults.point("heal.checkpoint.rotate")
    _rotate(root, keep, final.name)
    return final


def _rotate(root: Path, keep: int, current: str) -> None:
    """Drop mid-phase checkpoints beyond the newest ``keep`` (never ``current``, never a phase end)."""
    names = sorted(p.name for p in root.glob("phase*-step*") if p.is_dir() and "-end-" not in p.name)
    for name in names[: max(0, len(names) - keep)]:
        if name != current:
            shutil.rmtree(root / name, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; None when there is none; :class:`CheckpointError` when it is unreadable."""
    pointer = root / LATEST
    if not pointer.is_file():
        # killed between renaming its first checkpoint into place and writing the pointer: a renamed
        # checkpoint is complete, so the newest one is where the run stood
        done = sorted((_order(p.name), p) for p in root.glob("phase*-step*") if (p / "state.json").is_file()) \
            if root.is_dir() else []
        if not done:
            return None
        tmp = root / f".{LATEST}-{uuid.uuid4().hex[:6]}"
        tmp.write_text(done[-1][1].name)
        os.replace(tmp, pointer)
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    try:
        read_state(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/state.json cannot be read ({e})") from e
    return path


def _order(name: str) -> tuple[int, int, bool]:
    """(phase, step, phase end) of a checkpoint directory name ``phaseP-stepS[-end]-<id>``."""
    phase, step = name.split("-")[:2]
    return int(phase[len("phase"):]), int(step[len("step"):]), "-end-" in name


def read_state(path: Path) -> ResumeState:
    return ResumeState(**json.loads((path / "state.json").read_text()))


def load_part(path: Path, name: str, trusted: bool = False):
    """One saved part of a checkpoint, or None; ``trusted`` allows pickled Python objects (the RNG states)."""
    file = path / f"{name}.pt"
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e})") from e


class MetricsLog:
    """``OUT/metrics.jsonl``: one line per logged step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, state: ResumeState) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and _before(line, state)]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _before(line: str, state: ResumeState) -> bool:
    rec = json.loads(line)
    return (rec.get("phase_index", 0), rec.get("step", 0)) <= (state.phase, state.step)

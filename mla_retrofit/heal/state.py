"""Checkpoints of a heal run and the small resume state saved with each.

``OUT/checkpoints/<phaseP-stepS>/`` holds

* ``state.json``: :class:`ResumeState` (phase, step, data position, resolved config, finished phases);
* ``weights.pt``: the weights changed so far (the MLA attentions; every weight once phase 3 runs);
* ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: only inside a phase (a new phase starts a new optimizer).

A checkpoint is written into a temporary directory and renamed into place;
``OUT/checkpoints/latest`` (replaced atomically) then names it. Older
checkpoints beyond ``keep`` are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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


def checkpoint_name(state: ResumeState) -> str:
    return f"phase{state.phase}-step{state.step:07d}"


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write ``ckpt`` under ``root`` atomically, point ``latest`` at it, drop the oldest beyond ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(ckpt.state)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps(asdict(ckpt.state), indent=2))
    for name in ("weights", "optimizer", "scheduler", "rng"):
        if getattr(ckpt, name) is not None:
            torch.save(getattr(ckpt, name), tmp / f"{name}.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / f".{LATEST}-{uuid.uuid4().hex[:6]}"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    _rotate(root, keep, final.name)
    return final


def _rotate(root: Path, keep: int, current: str) -> None:
    names = sorted(p.name for p in root.glob("phase*-step*") if p.is_dir())
    for name in names[: max(0, len(names) - keep)]:
        if name != current:
            shutil.rmtree(root / name, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def read_state(path: Path) -> ResumeState:
    return ResumeState(**json.loads((path / "state.json").read_text()))


def load_part(path: Path, name: str, trusted: bool = False):
    """One saved part of a checkpoint, or None; ``trusted`` allows pickled Python objects (the RNG states)."""
    file = path / f"{name}.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=not trusted)


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

"""A conversion's work in progress on disk, so a killed run can resume from its last finished layer.

Everything a conversion computes per layer goes to ``.OUT.partial/`` next to the output as soon as the
layer is done, each file written under a temporary name and renamed into place:

- ``a-0000i.pt``: pass A's calibration statistics, RoPE plan and weighted spectrum of layer ``i``;
- ``a-hidden.pt``: the calibration hidden states after the last calibrated layer (one copy, replaced);
- ``b-0000i.safetensors``: layer ``i`` converted, in the output dtype, its report in the metadata;
- ``b-hidden.pt``: with ``--propagate converted`` or the output refit, the converted model's hidden states after
  the last converted layer (the ``a`` files then also hold the source's residual stream after each attention);
- ``run.json``: what the run was asked to do (the config and the source's files), so ``--resume``
  refuses to mix two different conversions.

Only the spectra stay in memory between the passes, so memory does not grow with depth. An uninterrupted
run reads its statistics back from the same files a resumed run does, which is what makes the two give
identical bytes. The directory is removed once the output is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import faults
from ..checkpoint import SafetensorsFile, ShardWriter
from ..errors import UserError

#: Config fields that may differ between a killed run and its resumption.
RESUME_FREE = ("overwrite", "resume")


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PartialRun:
    @property
    def teacher_samples(self) -> Path:
        """The sampled calibration text, kept for a rerun and copied into the output (for ``heal --data``)."""
        return self.dir / "teacher-samples.jsonl"

    def __init__(self, out: Path, fingerprint: dict, n_layers: int, resume: bool, discard: bool):
        self.dir = partial_dir(out)
        self.n = n_layers
        self.notes: list[str] = []
        if self.dir.exists():
            old = self._fingerprint()
            if discard:
                shutil.rmtree(self.dir)
            elif not resume and old == fingerprint:
                raise UserError(f"a partial conversion of these settings exists in {self.dir} ({self.describe()}); add "
                                "--resume to continue it, or --overwrite to discard it and start over")
            elif not resume:
                raise UserError(f"a partial conversion with other settings ({_diff(old, fingerprint)}) exists in "
                                f"{self.dir} ({self.describe()}); rerun with its settings and --resume, or add "
                                "--overwrite to discard it")
            elif old != fingerprint:
                raise UserError(f"--resume: the partial conversion in {self.dir} was made with other settings "
                                f"({_diff(old, fingerprint)}); rerun with those, or use --overwrite to start over")
            else:
                self.notes.append(f"resumed ({self.describe()})")
        elif resume:
            self.notes.append("--resume: no partial conversion found, started from the beginning")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.dir.glob("*.tmp"), *self.dir.glob("*.tmp.safetensors"), *self.dir.glob(".*.scratch")]:
            stale.unlink()
        (self.dir / "run.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True))

    def _fingerprint(self) -> dict | None:
        try:
            return json.loads((self.dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def describe(self) -> str:
        a = sum(1 for i in range(self.n) if self.a_path(i).is_file())
        b = sum(1 for i in range(self.n) if self.b_path(i).is_file())
        return f"{a}/{self.n} layers calibrated, {b}/{self.n} converted"

    # -- pass A --------------------------------------------------------------------------------------
    def a_path(self, i: int) -> Path:
        return self.dir / f"a-{i:05d}.pt"

    def save_a(self, i: int, stats, plan, spectrum: torch.Tensor, hidden: torch.Tensor,
               target: torch.Tensor | None = None) -> None:
        """``target``: the source's residual stream after this layer's attention (the output refit's target)."""
        faults.point("convert.calibrate")
        _save({"stats": stats, "plan": plan, "spectrum": spectrum, "target": target}, self.a_path(i))
        _save({"layer": i, "hidden": hidden}, self.dir / "a-hidden.pt")

    def load_a(self, i: int) -> dict:
        return torch.load(self.a_path(i), weights_only=False)

    def resume_a(self) -> tuple[int, torch.Tensor | None]:
        """(first layer still to calibrate, hidden states entering it or None to start from the embeddings)."""
        return self._resume("a-hidden.pt", self.a_path)

    # -- pass B --------------------------------------------------------------------------------------
    def b_path(self, i: int) -> Path:
        return self.dir / f"b-{i:05d}.safetensors"

    def save_b(self, i: int, tensors: dict[str, torch.Tensor], report: dict, hidden: torch.Tensor | None) -> None:
        writer = ShardWriter(self.dir, max_bytes=1 << 62, prefix=f"b-{i:05d}")
        for k, v in tensors.items():
            writer.add(k, v)
        writer.close(single_name=self.b_path(i).name, metadata={"report": json.dumps(report)})
        if hidden is not None:
            _save({"layer": i, "hidden": hidden}, self.dir / "b-hidden.pt")

    def load_b(self, i: int) -> SafetensorsFile:
        return SafetensorsFile(self.b_path(i))

    def resume_b(self, propagated: bool) -> tuple[int, torch.Tensor | None]:
        if not propagated:
            i = 0
            while i < self.n and self.b_path(i).is_file():
                i += 1
            return i, None
        return self._resume("b-hidden.pt", self.b_path)

    def _resume(self, hidden_file: str, path) -> tuple[int, torch.Tensor | None]:
        f = self.dir / hidden_file
        if not f.is_file():
            return 0, None
        saved = torch.load(f, weights_only=False)
        done = saved["layer"]
        if not all(path(i).is_file() for i in range(done + 1)):  # cannot happen unless files were deleted by hand
            return 0, None
        return done + 1, saved["hidden"]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _diff(old: dict | None, new: dict) -> str:
    if not old:
        return "its run.json is unreadable"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    flat = []
    for k in keys:
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            flat += [f"{k}.{j}" for j in sorted(set(old[k]) | set(new[k])) if old[k].get(j) != new[k].get(j)]
        else:
            flat.append(k)
    return "differs in " + ", ".join(flat)


def source_fingerprint(source) -> dict:
    """Names and sizes of the source's files: enough to notice a different or re-downloaded model."""
    d = Path(source.directory)
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".json", ".gguf")) if d.is_dir() else []
    if getattr(source, "gguf_file", None):
        files = [d / source.gguf_file]
    return {p.name: p.stat().st_size for p in files}

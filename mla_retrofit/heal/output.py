"""The end of a heal: the healed model, its record in ``conversion.json`` and its model card, written so that
the output directory looks complete only once everything is in place (``conversion.json`` goes last)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from typing import TYPE_CHECKING

from .. import __version__, dtypes
from . import models

if TYPE_CHECKING:
    from .recipe import HealResult


class OutputMixin:
    """Output writing of :class:`~mla_retrofit.heal.recipe.HealRecipe` (uses its ``cfg``, ``plan``, ``out``...)."""

    def heal_record(self, result: HealResult) -> dict:
        return {
            "mla_retrofit_version": __version__,
            "teacher": self.plan.teacher,
            "data": self.cfg.data,
            "mask_mode": self.mask_mode,
            "dev_split": "held out of the training documents" if self.dev_held_out else
                         "the training documents (too few to hold some out)",
            "dev": result.evals,
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
        models.save_student(model, tmp, self.tokenizer, {"README.md": _model_card(src, heal)})
        for path in sorted(tmp.iterdir()):
            os.replace(path, self.out / path.name)
        tmp.rmdir()
        marker = self.out / ".conversion.json.tmp"
        marker.write_text(json.dumps(record, indent=2))
        os.replace(marker, self.out / "conversion.json")
        if self.cfg.cleanup:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)


def saved_dtype(model_dir: str) -> torch.dtype:
    return dtypes.saved_dtype(json.loads((Path(model_dir) / "config.json").read_text()))


def _model_card(src: Path, heal: dict) -> str:
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else f"# MLA retrofit of {src}\n"
    phases = ", ".join(f"{p['name']} {p['steps']} steps (dev KL {p['dev_kl_before']:.4g} -> {p['dev_kl_after']:.4g}"
                       f"{'' if p['kept'] else ', dropped'})" for p in heal["phases"] if p["dev_kl_after"] is not None)
    return card + (f"\n## Healing\n\nHealed with mla-retrofit {heal['mla_retrofit_version']} on `{heal['data']}` "
                   f"({heal['tokens']:,} tokens): {phases}.\n`conversion.json` key `heal` holds the settings.\n")

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

from .. import __version__, dtypes
from . import models
from .config import HealConfig
from .data import HealWindows
from .results import HealResult


def heal_record(cfg: HealConfig, result: HealResult, data: HealWindows) -> dict:
    """The ``heal`` record ``conversion.json`` gets: the settings, the data, each phase's result, the dev scores."""
    plan = result.plan
    return {
        "mla_retrofit_version": __version__,
        "teacher": plan.teacher,
        "data": cfg.data,
        "mask_mode": data.mask_mode,
        "dev_split": "held out of the training documents" if data.dev_held_out else
                     "the training documents (too few to hold some out)",
        "dev": result.evals,
        "phases": [asdict(p) for p in result.phases],
        "steps": plan.total_steps,
        "tokens": plan.total_tokens,
        "final_losses": result.final_losses,
        "seconds": round(result.seconds, 1),
        "world_size": plan.world_size,
        "config": cfg.as_dict(),
    }


def place_output(cfg: HealConfig, model, tokenizer, heal: dict, ckpt_root: Path) -> None:
    """Save the healed model into ``cfg.output`` next to the run's files; ``conversion.json`` (the completion
    marker) goes last; with ``cfg.cleanup`` the checkpoints under ``ckpt_root`` go."""
    src, out = Path(cfg.model), Path(cfg.output)
    record = json.loads((src / "conversion.json").read_text()) if (src / "conversion.json").is_file() else {}
    record["heal"] = heal
    tmp = out / f".final-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    models.save_student(model, tmp, tokenizer, {"README.md": _model_card(src, heal)})
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
    tmp.rmdir()
    marker = out / ".conversion.json.tmp"
    marker.write_text(json.dumps(record, indent=2))
    os.replace(marker, out / "conversion.json")
    if cfg.cleanup:
        shutil.rmtree(ckpt_root, ignore_errors=True)


def saved_dtype(model_dir: str) -> torch.dtype:
    return dtypes.saved_dtype(json.loads((Path(model_dir) / "config.json").read_text()))


def _model_card(src: Path, heal: dict) -> str:
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else f"# MLA retrofit of {src}\n"
    phases = ", ".join(f"{p['name']} {p['steps']} steps (dev KL {p['dev_kl_before']:.4g} -> {p['dev_kl_after']:.4g}"
                       f"{'' if p['kept'] else ', dropped'})" for p in heal["phases"] if p["dev_kl_after"] is not None)
    return card + (f"\n## Healing\n\nHealed with mla-retrofit {heal['mla_retrofit_version']} on `{heal['data']}` "
                   f"({heal['tokens']:,} tokens): {phases}.\n`conversion.json` key `heal` holds the settings.\n")

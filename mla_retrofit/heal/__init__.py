"""Healing a converted model: layerwise imitation, MLA-only fine-tune, full fine-tune (see ``recipe``).

The recipe is imported on first use, so reading :class:`HealConfig` (the CLI does, for its help) needs no torch.
"""

from __future__ import annotations

import importlib

from .config import BASE, PHASES, PRESETS, HealConfig

__all__ = ["BASE", "PHASES", "PRESETS", "HealConfig", "HealRecipe", "HealResult", "PhasePlan", "PhaseResult", "Plan",
           "heal"]
_LAZY = {"PhasePlan": ".plan", "Plan": ".plan", "HealRecipe": ".recipe", "HealResult": ".results",
         "PhaseResult": ".results", "heal": ".recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

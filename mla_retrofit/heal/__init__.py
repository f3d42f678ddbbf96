"""Healing a converted model: layerwise imitation, MLA-only fine-tune, full fine-tune (see ``recipe``)."""

from .config import BASE, PHASES, PRESETS, HealConfig
from .plan import PhasePlan, Plan
from .recipe import HealRecipe, HealResult, PhaseResult, heal

__all__ = ["BASE", "PHASES", "PRESETS", "HealConfig", "HealRecipe", "HealResult", "PhasePlan", "PhaseResult", "Plan",
           "heal"]

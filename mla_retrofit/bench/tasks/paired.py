"""Paired comparison of two models on the same problems: agreement table, difference, McNemar, bootstrap CI."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


@dataclass
class Paired:
    problems: int
    model_passed: int
    baseline_passed: int
    both: int
    model_only: int
    baseline_only: int
    neither: int
    difference: float  # pass@1(model) - pass@1(baseline), in points of a fraction
    ci95: tuple[float, float]  # paired bootstrap over problems
    mcnemar_p: float  # exact two-sided, on the discordant problems

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs under Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(model: list[bool], baseline: list[bool], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    n = len(model)
    if n == 0:
        return (0.0, 0.0)
    d = [int(a) - int(b) for a, b in zip(model, baseline)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return (means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))])


def compare(model: list[bool], baseline: list[bool], draws: int = 10_000) -> Paired:
    if len(model) != len(baseline):
        raise ValueError("paired results need the same problems for both models")
    both = sum(a and b for a, b in zip(model, baseline))
    m_only = sum(a and not b for a, b in zip(model, baseline))
    b_only = sum(b and not a for a, b in zip(model, baseline))
    n = len(model)
    return Paired(problems=n, model_passed=sum(model), baseline_passed=sum(baseline), both=both, model_only=m_only,
                  baseline_only=b_only, neither=n - both - m_only - b_only,
                  difference=(sum(model) - sum(baseline)) / n if n else 0.0,
                  ci95=bootstrap_ci(model, baseline, draws), mcnemar_p=mcnemar_exact(m_only, b_only))

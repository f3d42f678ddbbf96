"""Fidelity of a converted model against its baseline on the same tokens: perplexity, KL and top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..metrics import kl_from_log_probs, top1_agreement


@dataclass
class Fidelity:
    tokens: int
    ppl_model: float
    ppl_baseline: float
    kl: float  # mean KL(baseline || model) per token, nats
    top1_agreement: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_model / self.ppl_baseline

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


@torch.no_grad()
def compare(model, baseline, ids: torch.Tensor, batch_size: int = 2, progress=None) -> Fidelity:
    """Both models score ``ids`` (``[N, T]``); next-token statistics over all ``N * (T - 1)`` positions."""
    nll_m = nll_b = kl = agree = 0.0
    count = 0
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s : s + batch_size]
        lm = F.log_softmax(model(x, use_cache=False).logits[:, :-1].float(), dim=-1)
        lb = F.log_softmax(baseline(x, use_cache=False).logits[:, :-1].float(), dim=-1)
        target = x[:, 1:].unsqueeze(-1)
        nll_m += float(-lm.gather(-1, target).sum())
        nll_b += float(-lb.gather(-1, target).sum())
        kl += float(kl_from_log_probs(lm, lb).sum())
        agree += float(top1_agreement(lm, lb).sum())
        count += target.numel()
        if progress:
            progress(min(s + batch_size, ids.shape[0]), ids.shape[0])
    return Fidelity(
        tokens=count,
        ppl_model=math.exp(nll_m / count),
        ppl_baseline=math.exp(nll_b / count),
        kl=kl / count,
        top1_agreement=agree / count,
    )

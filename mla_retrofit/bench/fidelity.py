"""Fidelity of a converted model against its baseline on the same tokens: perplexity, KL and top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    kl_by_position: list[float] = field(default_factory=list)  # mean KL per equal span of positions (``buckets``)

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_model / self.ppl_baseline

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


CHUNK_TOKENS = 256  # positions x batch whose float32 log-probabilities are held at once


def _final_hidden(model, x: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state


def _log_probs(model, x: torch.Tensor):
    """``(span, log_probs)`` of the next-token distributions over positions ``0 .. T-2``, a few positions at a time:
    the output head runs on slices of the final hidden states, so a 152k vocabulary never needs ``B x T x V``
    float32 at once."""
    hidden = _final_hidden(model, x)[:, :-1]
    head = model.get_output_embeddings()
    step = max(1, CHUNK_TOKENS // x.shape[0])
    for t in range(0, hidden.shape[1], step):
        yield slice(t, t + step), F.log_softmax(head(hidden[:, t:t + step]).float(), dim=-1)


@torch.no_grad()
def compare(model, baseline, ids: torch.Tensor, batch_size: int = 2, progress=None, buckets: int = 0) -> Fidelity:
    """Both models score ``ids`` (``[N, T]``); next-token statistics over all ``N * (T - 1)`` positions.

    ``buckets`` > 0 also gives the mean KL over each of that many equal spans of positions (the first
    span holds the earliest positions): where in a window the model departs from its baseline.
    """
    nll_m = nll_b = kl = agree = 0.0
    count = 0
    by_position = torch.zeros(ids.shape[1] - 1, dtype=torch.float64)
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s : s + batch_size]
        for (span, lm), (_, lb) in zip(_log_probs(model, x), _log_probs(baseline, x)):
            target = x[:, 1:][:, span].unsqueeze(-1)
            nll_m += float(-lm.gather(-1, target).sum())
            nll_b += float(-lb.gather(-1, target).sum())
            kl_tokens = kl_from_log_probs(lm, lb)
            kl += float(kl_tokens.sum())
            by_position[span] += kl_tokens.double().sum(0)
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
        kl_by_position=[float(c.mean()) / ids.shape[0] for c in by_position.chunk(buckets)] if buckets else [],
    )

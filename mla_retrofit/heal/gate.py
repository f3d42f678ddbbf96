"""The fidelity gate: KL and top-1 agreement of the student against the teacher on the run's dev split.

The dev split is held out of the run's own training text (``dev_fraction`` of
its documents, packed like the training windows); nothing trains on it. A heal
measures it before training and after every phase; a phase whose end is worse
than the best so far is not kept (unless ``keep_last``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .losses import kl_per_token


@dataclass
class DevScore:
    kl: float  # mean KL(teacher || student) per position, nats
    top1: float  # share of positions where the argmax tokens agree
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def dev_score(student, teacher, ids: torch.Tensor, positions: torch.Tensor, batch_size: int = 2,
              chunk: int = 1024) -> DevScore:
    """Score ``student`` against ``teacher`` on every position of the dev windows (``[N, T]``)."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl = agree = 0.0
    count = 0
    try:
        for s in range(0, ids.shape[0], batch_size):
            x = ids[s : s + batch_size].to(device).long()
            p = positions[s : s + batch_size].to(device).long()
            h = student.model(input_ids=x, position_ids=p, use_cache=False).last_hidden_state
            t = teacher.model(input_ids=x, position_ids=p, use_cache=False).last_hidden_state
            step = max(1, chunk // x.shape[0])
            for c in range(0, x.shape[1], step):
                ls = student.lm_head(h[:, c : c + step]).float()
                lt = teacher.lm_head(t[:, c : c + step].to(teacher.lm_head.weight.dtype)).float()
                kl += float(kl_per_token(ls, lt).sum())
                agree += float((ls.argmax(-1) == lt.argmax(-1)).sum())
                count += ls.shape[0] * ls.shape[1]
    finally:
        student.train(was_training)
    return DevScore(kl=kl / max(count, 1), top1=agree / max(count, 1), tokens=count)

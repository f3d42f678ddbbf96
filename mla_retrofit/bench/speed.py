"""Prefill and greedy-decode speed of a model and its baseline, alternated in one run on the same hardware."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class SpeedPoint:
    context: int
    batch: int
    prefill_tok_s: float
    decode_tok_s: float  # new tokens per second (all sequences of the batch)
    decode_ms_per_step: float


@dataclass
class SpeedComparison:
    model: SpeedPoint
    baseline: SpeedPoint
    cache: str = "dynamic"
    compiled: bool = False

    @property
    def decode_ratio(self) -> float:
        return self.model.decode_tok_s / self.baseline.decode_tok_s

    @property
    def prefill_ratio(self) -> float:
        return self.model.prefill_tok_s / self.baseline.prefill_tok_s

    def as_dict(self) -> dict:
        return {"cache": self.cache, "compiled": self.compiled, "model": asdict(self.model), "baseline": asdict(self.baseline),
                "decode_ratio": self.decode_ratio, "prefill_ratio": self.prefill_ratio}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CACHES = ("dynamic", "static")
SPEED_MODES = ("dynamic", "static", "compiled")  # compiled: static cache decoded through torch.compile


def _new_cache(model, kind: str, max_len: int):
    if kind == "dynamic":
        return None  # the model makes its default cache, as generate() does
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, cache=None):
    """One prefill; only the last position's logits are computed, as ``generate()`` does."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    return out.cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - t0


@torch.no_grad()
def _decode(model, cache, token: torch.Tensor, steps: int) -> list[float]:
    times = []
    device = token.device
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def compare_speed(
    model, baseline, context: int, batch: int = 1, steps: int = 8, rounds: int = 3, vocab: int | None = None,
    seed: int = 0, cache: str = "dynamic", compile: bool = False,
) -> SpeedComparison:
    """Prefill ``context`` random tokens once per model, then ``rounds`` x ``steps`` greedy decode steps,
    the two models alternating round by round; the first step of each round is a warm-up and not counted.
    Decode speed is the median step time; the cache is cropped back to ``context`` between rounds.

    ``cache="dynamic"`` gives each model the cache ``generate()`` gives it by default (a ``DynamicCache``: the
    GQA baseline grows it with ``torch.cat``, the MLA model writes its latent in place); ``"static"`` gives
    both a preallocated ``StaticCache``, so the comparison is of attention and weights alone.

    ``compile=True`` (static cache only) decodes through ``torch.compile`` (CUDA graphs on a GPU), which
    removes the per-kernel launch cost that dominates eager decoding of small batches on a GPU; three
    untimed steps compile and capture first."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}")
    if compile and cache != "static":
        raise ValueError("compile needs the static cache (fixed shapes)")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    _prefill(model, ids[:, :16]), _prefill(baseline, ids[:, :16])  # warm-up
    state = {}
    for name, m in (("model", model), ("baseline", baseline)):
        kv, tok, secs = _prefill(m, ids, _new_cache(m, cache, context + steps + 1))
        step_fn = m
        if compile:
            step_fn = torch.compile(m, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
            _decode(step_fn, kv, tok, 3)
            kv.crop(-3)
        state[name] = {"m": step_fn, "cache": kv, "tok": tok, "prefill": secs, "steps": []}
    for _ in range(rounds):
        for name in ("model", "baseline"):
            s = state[name]
            times = _decode(s["m"], s["cache"], s["tok"], steps + 1)[1:]
            s["steps"].extend(times)
            s["cache"].crop(context - s["cache"].get_seq_length())  # negative: drop the decoded tokens
    points = {}
    for name, s in state.items():
        step = statistics.median(s["steps"])
        points[name] = SpeedPoint(context=context, batch=batch, prefill_tok_s=batch * context / s["prefill"],
                                  decode_tok_s=batch / step, decode_ms_per_step=step * 1000)
    return SpeedComparison(model=points["model"], baseline=points["baseline"], cache=cache, compiled=compile)

"""Calibration text sampled from the source model itself: ``--calib teacher-samples``, half of the default.

The source continues a few built-in prompts at temperature 1 (:mod:`..sampling`, the same sampler
and prompts healing distils on). The statistics a conversion fits then come from text the model itself
puts its probability mass on, rather than from one corpus's domain. On SmolLM2-135M at 50% KV, samples
alone took the held-out perplexity ratio on *Persuasion* from 1.442x (stdlib docstrings) to 1.293x but
the Python Language Reference's from 1.241x to 1.822x; the default mixes both (``teacher-samples+builtin``,
1.295x on *Persuasion*; ``docs/benchmarks.md`` §9).

Sampling holds the whole source model in memory (the rest of the conversion holds one layer at a time):
on a GPU when one is visible, else on the CPU, with bf16 weights where the hardware multiplies bf16
natively (AMX or AVX-512 BF16), else float32. The
texts are written to the partial run (so ``--resume`` does not sample again) and to the output's
``data/teacher-samples.jsonl``, with a header line of their settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .. import sampling as samples
from ..dtypes import resolve_precision

#: prompt + continuation of one text fill about 0.85 of a 512-token window on SmolLM2 (chat answers end early)
OVERSAMPLE = 1.25
ROUNDS = 4  # sampling rounds at most, each topping up what the last left short


def settings(model: str, windows: int, seq_len: int, seed: int, device: str, precision: str) -> dict:
    return {**samples.settings(math.ceil(windows * OVERSAMPLE), seq_len, seed, 1.0, model, precision),
            "purpose": "calibration", "windows": windows, "device": device}


def calibration_texts(model: str, tokenizer, windows: int, seq_len: int, seed: int, cache: Path | None,
                      progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Texts sampled from ``model`` holding at least ``windows`` x ``seq_len`` tokens (joined by EOS), read
    from ``cache`` when it holds them for the same settings (and written there when not; None: no cache).

    The source is loaded whole for this, in bf16 where the hardware multiplies bf16 natively (half the memory of
    float32 and, on this project's CPU, twice the speed: docs/benchmarks.md §12), and dropped afterwards."""
    from ..sources import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto")
    wanted = settings(model, windows, seq_len, seed, device, precision)
    texts = samples.read_cached(cache, wanted) if cache is not None else None
    if texts is not None:
        return texts
    if progress:
        progress(0, wanted["samples"])  # the bar shows from the start (sampling reports once per batch)
    teacher = load_model(model, torch.bfloat16 if precision == "bf16" else torch.float32).to(device)
    need = windows * seq_len
    texts, have, n = [], 0, wanted["samples"]
    for round_ in range(ROUNDS):
        new = samples.sample(teacher, tokenizer, n, seq_len, seed + 100_003 * round_, progress=progress)
        texts += new
        have += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in new)
        if have >= need:
            break
        n = math.ceil((need - have) / (have / len(texts)) * OVERSAMPLE)  # top up at the rate seen so far
    del teacher
    if cache is not None:
        samples.write(cache, wanted, texts)
    return texts

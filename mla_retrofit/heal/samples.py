"""``teacher-samples``: healing text sampled from the teacher itself, cached in the output directory.

Needs no data set and leaks no evaluation text: short built-in prompts (half
as chat requests through the chat template, half as plain openings of prose),
continued by the original model at temperature 1 (plain sampling unless ``top_p`` < 1), with a
fixed seed. Distilling on the teacher's own samples pulls the student toward
the teacher where the teacher puts its probability mass.

Tokens are drawn by inverting the cumulative distribution with one uniform
number per row (:class:`InverseCdfSampler`): ``generate``'s own sampler draws
an exponential variate for every vocabulary entry, and on a CPU that was 27%
of the sampling time (profiled, 96 texts x 200 tokens).

The samples are written once to ``OUT/data/teacher-samples.jsonl`` (one
``{"text": ...}`` per line after a header line with the settings); a rerun or a
``--resume`` with the same settings reads them back, and the file can be
passed to another heal as ``--data``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

REQUESTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a small market town on an autumn morning.",
    "Write a letter from a sailor to his sister at home.",
    "Explain how bread rises, as you would to a curious child.",
    "Tell the story of a family moving to a new city.",
    "Write a diary entry of a girl on her first day at a new school.",
    "Describe a thunderstorm over the sea, seen from a cliff.",
    "Write a conversation between two old friends who meet after twenty years.",
    "Explain why the seasons change during the year.",
    "Write a short fable about a fox and a crow.",
    "Describe the kitchen of a busy restaurant at dinner time.",
    "Tell a story about a lost dog finding its way home.",
    "Write a speech a mayor gives at the opening of a new bridge.",
    "Describe a country house and the people who live in it.",
    "Write a story about a young doctor in a mountain village.",
    "Explain how a bill becomes a law, in plain words.",
    "Write a mystery story that begins with a missing key.",
    "Describe a day in the life of a farmer in the nineteenth century.",
    "Write a review of a play you saw at the theatre.",
    "Tell the history of a small fishing harbour.",
    "Write a story about two sisters who disagree about marriage.",
    "Give advice to someone who is starting their first job.",
    "Describe a winter evening by the fire with a large family.",
    "Write a news report about a flood in a river valley.",
)
OPENINGS = (
    "It was late in the evening when",
    "The house stood at the end of a long lane, and",
    "My dear friend,\n\nI write to tell you that",
    "Chapter 1\n\nThe first thing anyone noticed about the new neighbours was",
    "In the spring of that year the whole village was talking about",
    "\"You cannot be serious,\" she said, and",
    "The history of the town begins with",
    "He had never liked the city, but",
    "There are few pleasures in life greater than",
    "On the morning of the wedding, the weather",
    "The letter arrived on a Tuesday, and by Wednesday",
    "Most people believe that",
    "When the ship finally reached the harbour,",
    "Nobody in the family could remember a time when",
    "The old professor cleared his throat and began:",
    "Across the valley, the lights of the farm",
)

Progress = Callable[[int, int], None]


def prompts(tokenizer) -> list[str]:
    """The built-in prompts as text: chat requests rendered by the chat template, then plain openings."""
    out = []
    for request in REQUESTS:
        if getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                     add_generation_prompt=True))
        else:
            out.append(f"user: {request}\nassistant: ")
    return out + list(OPENINGS)


def settings(n: int, length: int, seed: int, top_p: float, teacher: str, precision: str = "fp32") -> dict:
    return {"kind": "teacher-samples", "samples": n, "max_new_tokens": length, "seed": seed, "temperature": 1.0,
            "top_p": top_p, "teacher": teacher, "precision": precision, "sampler": "inverse-cdf"}


def read_cached(path: Path, wanted: dict) -> list[str] | None:
    """The cached samples when ``path`` holds them for exactly ``wanted``; else None."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]) != wanted:
        return None
    return [json.loads(line)["text"] for line in lines[1:] if line.strip()]


class InverseCdfSampler:
    """A ``generate`` logits processor that draws the next token itself and leaves only it for greedy search.

    Draws from ``softmax(scores)`` (what the earlier processors, e.g. top-p, left of it): the first token
    whose cumulative probability reaches a uniform draw. Uses the global torch RNG (seeded by the caller).
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.full_like(scores, float("-inf")).scatter_(1, draw(scores), 0.0)


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of ``scores`` (logits ``[B, V]``) drawn from their softmax: ``[B, 1]`` indices."""
    cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
    u = torch.rand(scores.shape[0], 1, device=scores.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(scores.shape[-1] - 1)


@torch.no_grad()
def sample(teacher, tokenizer, n: int, length: int, seed: int, top_p: float = 1.0, batch_size: int = 96,
           progress: Progress | None = None) -> list[str]:
    """``n`` texts: prompt + up to ``length`` sampled tokens each, prompts cycled in a fixed order."""
    texts = prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    from transformers import LogitsProcessorList, TopPLogitsWarper

    processors = LogitsProcessorList(([TopPLogitsWarper(top_p)] if top_p < 1 else []) + [InverseCdfSampler()])
    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, n, batch_size):
            batch = [texts[i % len(texts)] for i in range(start, min(n, start + batch_size))]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed * 1000003 + start)
            ids = teacher.generate(**enc, do_sample=False, logits_processor=processors, max_new_tokens=length,
                                   pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            for prompt, row in zip(batch, ids[:, enc["input_ids"].shape[1]:]):
                keep = row[row != pad] if pad != tokenizer.eos_token_id else _until_eos(row, pad)
                out.append(prompt + tokenizer.decode(keep, skip_special_tokens=False))
            if progress:
                progress(len(out), n)
    finally:
        tokenizer.padding_side = side
    return out


def _until_eos(row: torch.Tensor, eos: int) -> torch.Tensor:
    """Tokens up to and including the first EOS (generate pads with EOS after it)."""
    hits = (row == eos).nonzero()
    return row[: int(hits[0]) + 1] if len(hits) else row


def write(path: Path, header: dict, texts: list[str]) -> None:
    """Write the cache atomically: it appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)

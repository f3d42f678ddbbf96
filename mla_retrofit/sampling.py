"""``teacher-samples``: text sampled from the original model itself, for calibration (convert) and healing (heal).

Needs no data set and leaks no evaluation text: short built-in prompts (half
as chat requests through the chat template, half as plain openings of prose),
continued by the original model at temperature 1 (plain sampling unless ``top_p`` < 1), with a
fixed seed. Distilling on the teacher's own samples pulls the student toward
the teacher where the teacher puts its probability mass.

Tokens are drawn by inverting the cumulative distribution with one uniform
number per row (:class:`InverseCdfSampler`): ``generate``'s own sampler draws
an exponential variate for every vocabulary entry, and on a CPU that was 27%
of the sampling time (profiled, 96 texts x 200 tokens).

For the decoder families the project converts (Llama, Mistral, Qwen2, Qwen3),
the texts are decoded by :func:`decode`, not ``generate``: a preallocated
key/value cache per layer, and grouped-query attention computed per key/value
head (the query heads of a group stacked as rows), so no step copies the cache
or repeats it per query head. Other models, or a sliding window shorter than
the texts, go through ``generate``; both give the same tokens for the same
logits (tested on tiny models of each family).

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

from .modeling.rope_mla import apply_rope

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
           progress: Progress | None = None, fast: bool | None = None) -> list[str]:
    """``n`` texts: prompt + up to ``length`` sampled tokens each, prompts cycled in a fixed order.

    ``fast``: decode with :func:`decode` (True) or ``generate`` (False); None picks :func:`decode` where
    :func:`decodable` allows it.
    """
    texts = prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    from transformers import LogitsProcessorList, TopPLogitsWarper

    processors = LogitsProcessorList(([TopPLogitsWarper(top_p)] if top_p < 1 else []) + [InverseCdfSampler()])
    out: list[str] = []
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:  # a tokenizer without one (some GGUFs) pads the prompts with its EOS token
        tokenizer.pad_token = tokenizer.eos_token
    try:
        for start in range(0, n, batch_size):
            batch = [texts[i % len(texts)] for i in range(start, min(n, start + batch_size))]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed * 1000003 + start)
            if fast if fast is not None else decodable(teacher, enc["input_ids"].shape[1] + length):
                new = decode(teacher, enc["input_ids"], enc["attention_mask"], length, processors, pad)
            else:
                new = teacher.generate(**enc, do_sample=False, logits_processor=processors, max_new_tokens=length,
                                       pad_token_id=pad, temperature=None, top_p=None,
                                       top_k=None)[:, enc["input_ids"].shape[1]:]
            for prompt, row in zip(batch, new):
                keep = row[row != pad] if pad != tokenizer.eos_token_id else _until_eos(row, pad)
                out.append(prompt + tokenizer.decode(keep, skip_special_tokens=False))
            if progress:
                progress(len(out), n)
    finally:
        tokenizer.padding_side = side
        if pad_token is None:
            tokenizer.pad_token = None
    return out


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers decode() knows


def decodable(model, total: int) -> bool:
    """Whether :func:`decode` runs ``model`` exactly: a known family, and no sliding window shorter than ``total``."""
    cfg = model.config
    inner = getattr(model, "model", None)
    if cfg.model_type not in FAMILIES or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < total:
        return False
    return all(hasattr(layer.self_attn, name) for layer in inner.layers
               for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))


class _Decoder:
    """The teacher's layers run on a preallocated cache: ``[B, kv_heads, total, head_dim]`` keys and values."""

    def __init__(self, model, total: int):
        self.model, self.inner, self.total = model, model.model, total
        cfg = model.config
        self.kv_heads = cfg.num_key_value_heads
        self.rep = cfg.num_attention_heads // self.kv_heads
        self.caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.inner.layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """Logits of the last position; ``ids`` ``[B, q]`` sit at cache slots ``start..start+q``; ``mask``:
        ``[B, 1, q, start+q]`` keys each query may see (True = attend)."""
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        B, q = ids.shape
        mask = mask.repeat(1, 1, self.rep, 1)  # rows of a group's heads are stacked: head j's row p at j*q + p
        for i, layer in enumerate(self.inner.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            qs, ks, vs = (proj(x).view(B, q, -1, a.head_dim) for proj in (a.q_proj, a.k_proj, a.v_proj))
            if hasattr(a, "q_norm"):  # Qwen3
                qs, ks = a.q_norm(qs), a.k_norm(ks)
            qs, ks, vs = (t.transpose(1, 2) for t in (qs, ks, vs))
            qs, ks = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
            if self.caches[i] is None:
                shape = (B, self.kv_heads, self.total, a.head_dim)
                self.caches[i] = (ks.new_zeros(shape), vs.new_zeros(shape))
            k_cache, v_cache = self.caches[i]
            k_cache[:, :, start : start + q], v_cache[:, :, start : start + q] = ks, vs
            grouped = qs.reshape(B, self.kv_heads, self.rep * q, a.head_dim)
            o = torch.nn.functional.scaled_dot_product_attention(
                grouped, k_cache[:, :, : start + q], v_cache[:, :, : start + q], attn_mask=mask, scale=a.scaling)
            o = o.view(B, -1, q, a.head_dim).transpose(1, 2).reshape(B, q, -1)
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.inner.norm(h[:, -1:]))[:, -1].float()


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, length: int, processors, pad: int) -> torch.Tensor:
    """Up to ``length`` new tokens per row of the left-padded prompts ``ids``/``mask`` (``[B, P]``), chosen as
    ``generate(do_sample=False, logits_processor=processors)`` chooses them: the argmax of the processed
    scores, ``pad`` after a row's end-of-sequence token, stopping when every row has ended. ``[B, <= length]``."""
    B, P = ids.shape
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                       device=ids.device)
    total = P + length
    decoder = _Decoder(model, total)
    valid = torch.zeros(B, total, dtype=torch.bool, device=ids.device)
    valid[:, :P] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    eye = torch.eye(P, dtype=torch.bool, device=ids.device)
    # causal over the real tokens; a padding query sees only itself (finite, and no real query sees it)
    first = torch.ones_like(eye).tril() & valid[:, None, None, :P] | eye
    logits = decoder.forward(ids, positions, 0, first)
    seq = torch.cat([ids, torch.full((B, length), pad, dtype=ids.dtype, device=ids.device)], dim=1)
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    position = positions[:, -1:] + 1
    *warpers, last = processors
    for t in range(length):
        if isinstance(last, InverseCdfSampler):  # draw directly: no -inf row to build and scan
            scores = logits
            for warper in warpers:
                scores = warper(seq[:, : P + t], scores)
            token = draw(scores)[:, 0]
        else:
            token = processors(seq[:, : P + t], logits).argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        seq[:, P + t] = token
        unfinished &= ~torch.isin(token, eos)
        if not unfinished.any() or t == length - 1:
            return seq[:, P : P + t + 1]
        valid[:, P + t] = True
        logits = decoder.forward(token[:, None], position, P + t, valid[:, None, None, : P + t + 1])
        position = position + 1
    return seq[:, P:]


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

"""Which llama.cpp pre-tokenizer splits text as a Hugging Face ``tokenizer.json`` does: told by behaviour.

llama.cpp's BPE tokenizer first splits text with a list of regular expressions chosen by the GGUF key
``tokenizer.ggml.pre`` (``src/llama-vocab.cpp``), then runs BPE inside each piece. A GGUF written with the wrong
name tokenizes the model's text into other ids, silently (``default`` isolates every punctuation run, say).

llama.cpp's own converter recognises known models by a hash of their token ids on a fixed text. Here the
candidate names are told apart by what they do instead: each candidate's regex list (the expressions llama.cpp
applies for that name, transcribed below with the version they were read from) splits a probe text, and the
tokenizer's own pre-tokenizer splits the same text; the first candidate whose pieces are identical wins. A
tokenizer that no candidate reproduces is refused: the caller names ``--tokenizer-gguf`` in the error.

The probe covers what the candidates disagree on: digit runs (one at a time, up to three, unbounded), contractions
in both cases, letters after punctuation, combining marks, newlines and whitespace runs, CJK, code and emoji.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

READ_FROM = "src/llama-vocab.cpp of llama.cpp as vendored in llama-cpp-python 0.3.36"

_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class Candidate:
    name: str  # the tokenizer.ggml.pre value
    regexes: tuple[str, ...]  # applied in order, each splitting the pieces of the previous
    ignore_merges: bool = False  # llama.cpp sets it for this name: a whole piece found in the vocabulary is one token


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("llama-bpe", (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                            r"|\s*[\r\n]+|\s+(?!\S)|\s+",), ignore_merges=True),
    Candidate("qwen2", (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    Candidate("qwen35", (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                         r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    Candidate("smollm", (r"\p{N}", _GPT2)),
    Candidate("gpt-2", (_GPT2,)),
)

PROBE = (
    "Chapter 12: In 1817, she'd written 3 letters; THEY'RE lost. I'M sure it's 45,000.5 or 1234567 -- maybe!\n"
    "  Naïve café, Zürich résumé (e\u0301 combining), Москва 2024; 東京は晴れ、気温25度。 한국어 ok\n\n\n"
    "def f(x):\r\n\treturn x**2 + 0x1F  # don't   stop...\n"
    "    if a!=b and c<=d: print(\"{'k': [1,2]}\")\t\t\n"
    "emoji 🙂🙂 and ...?! ''quoted'' 'll 'VE (((nested))) __init__ a_b-c/d\\e  \n \n"
)


def _split(text: str, regexes: tuple[str, ...]) -> list[tuple[int, int]]:
    """llama.cpp's splitting: each regex cuts every piece into its matches and the gaps between them."""
    import regex

    spans = [(0, len(text))]
    for expr in regexes:
        pattern = regex.compile(expr)
        out = []
        for start, end in spans:
            pos = start
            for m in pattern.finditer(text, start, end):
                if m.start() == m.end():
                    continue
                if m.start() > pos:
                    out.append((pos, m.start()))
                out.append((m.start(), m.end()))
                pos = m.end()
            if pos < end:
                out.append((pos, end))
        spans = out
    return spans


def _hf_split(tokenizer, text: str) -> list[tuple[int, int]]:
    if tokenizer.pre_tokenizer is None:
        return [(0, len(text))]
    return [tuple(off) for _, off in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def identify(tokenizer_json: Path) -> Candidate:
    """The llama.cpp pre-tokenizer that splits text exactly as ``tokenizer_json`` does; a UserError when none does."""
    from tokenizers import Tokenizer

    hint = "pass --tokenizer-gguf with a GGUF of the source model (llama.cpp's convert_hf_to_gguf.py writes one)"
    spec = json.loads(Path(tokenizer_json).read_text())
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"{tokenizer_json} normalizes text ({normalizer}), which llama.cpp's BPE does not: {hint}")
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges", False))
    hf = _hf_split(Tokenizer.from_file(str(tokenizer_json)), PROBE)
    for cand in CANDIDATES:
        if cand.ignore_merges == ignore_merges and _split(PROBE, cand.regexes) == hf:
            return cand
    names = ", ".join(c.name for c in CANDIDATES)
    raise UserError(f"cannot tell which llama.cpp pre-tokenizer splits text as {tokenizer_json} does (none of {names} "
                    f"does); {hint}")

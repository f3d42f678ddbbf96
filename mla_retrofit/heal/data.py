"""Healing data -> packed token windows that respect document borders.

A record is a conversation (a ``messages`` list) or a plain text (``str``).
Which tokens of a conversation are next-token targets (``mask == 1``) depends on
the tokenizer:

* ``generation``: the chat template marks assistant text with ``{% generation %}``;
  every assistant turn is a target (``return_assistant_tokens_mask``).
* ``last-turn``: a chat template without those markers (SmolLM2, Llama 3, Qwen);
  the conversation up to its last assistant turn is rendered with
  ``add_generation_prompt=True`` and only the tokens after that prefix (the last
  answer and its end-of-turn token) are targets; earlier answers are context.
* ``plain``: no chat template; turns are written ``role: content`` and the last
  assistant content plus EOS are targets.

A plain text is tokenised as it is (plus EOS) and every token is a target.
Conversations without an assistant turn are skipped. Distillation uses every
position of a window whatever the mask.

Windows hold exactly ``seq_len`` tokens (no padding, no token dropped) and
carry ``position_ids`` that restart at 0 at every piece of a document; with no
attention mask and no cache, transformers turns those into a block-diagonal
causal mask, so no token attends across a document border.

Pieces are packed so that the positions of a window are trained as evenly as
the documents allow. A document is cut into ``seq_len``-token pieces (the last
one shorter), and each piece goes whole into the first open window with room
for it, or opens a new one; a window is emitted when full. At most
:data:`OPEN_WINDOWS` windows are open (a full-length piece is a window of its
own); when a shorter piece fits none and one more would be needed, the oldest
is filled with the end of the piece (a fragment, its positions restarting at
0), and the rest of the piece, still starting at its own position 0, goes on.

Cutting documents at the window border instead (plain concatenation) starts
most pieces mid-window. On 512-token teacher samples the four quarters of a
window were trained 1.82 / 1.20 / 0.71 / 0.26 tokens per position per window;
with this packing 1.26 / 0.98 / 0.90 / 0.86 (``benchmarks/packing_positions.py``;
the rest of the imbalance is the documents shorter than a window). On held-out
prose the healed model's KL at positions 384-511 fell (0.210 -> 0.193) and at
0-127 rose (0.145 -> 0.151); the mean is the same within one run's noise
(``docs/benchmarks.md`` §7).

When the data runs out the order is reshuffled and the data repeats. The
stream is a pure function of (records, tokenizer, seq_len, seed), which makes
resuming exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

OPEN_WINDOWS = 8  # windows filled at once: more place pieces better and reorder the data more


def mask_mode(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "plain"
    return "generation" if "{% generation %}" in template or "{%- generation %}" in template else "last-turn"


def _last_assistant(messages: list[dict]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def encode(messages: list[dict], tokenizer, mode: str) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 target mask of one conversation (empty when it has no assistant turn)."""
    last = _last_assistant(messages)
    if last is None:
        return [], []
    messages = messages[: last + 1]
    if mode == "generation":
        enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        mask = list(enc["assistant_masks"])
        if any(mask):
            return _ids(enc), mask
        mode = "last-turn"  # the markers did not fire for this conversation
    if mode == "last-turn":
        prefix = _prompt_ids(messages[:last], tokenizer)
        ids = _ids(tokenizer.apply_chat_template(messages, return_dict=True))
    else:
        head = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:last]) + "assistant: "
        prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = prefix + tokenizer(str(messages[last]["content"]), add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n = len(prefix) if ids[: len(prefix)] == prefix else _common_prefix(ids, prefix)
    return ids, [0] * n + [1] * (len(ids) - n)


def _prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    try:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True))
    except Exception:  # some templates reject an empty conversation; then every token is a target
        if messages:
            raise
        return []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_record(record, tokenizer, mode: str) -> tuple[list[int], list[int]]:
    """Token ids and target mask of one record: a conversation (``list`` of messages) or a text (``str``)."""
    if isinstance(record, str):
        ids = list(tokenizer(record, add_special_tokens=False)["input_ids"])
        ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return ids, [1] * len(ids)
    return encode(record, tokenizer, mode)


def split_dev(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev) records: a seeded ``fraction`` of them (at least one, never all) held out for the dev split."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_dev = min(len(records) - 1, max(1, round(fraction * len(records))))
    dev = set(order[:n_dev])
    return [r for i, r in enumerate(records) if i not in dev], [records[i] for i in sorted(dev)]


class PackedStream:
    """The run's deterministic stream of packed windows; :meth:`take` returns its first ``n``."""

    def __init__(self, records: list, tokenizer, seq_len: int, seed: int):
        if not records:
            raise UserError("the healing data holds no conversations or texts")
        self.records, self.tokenizer, self.seq_len, self.seed = records, tokenizer, seq_len, seed
        self.mode = mask_mode(tokenizer)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epochs = 0

    def _encoded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            ids, mask = encode_record(self.records[i], self.tokenizer, self.mode)
            self._cache[i] = (torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool))
        return self._cache[i]

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.records), generator=g).tolist()

    def _pieces(self):
        """``(ids, mask)`` pieces of at most ``seq_len`` tokens, documents in each epoch's order, forever."""
        epoch = 0
        while True:
            found, self.epochs = False, epoch + 1
            for i in self._order(epoch):
                rid, rmask = self._encoded(i)
                for s in range(0, len(rid), self.seq_len):
                    found = True
                    yield rid[s : s + self.seq_len], rmask[s : s + self.seq_len]
            if not found:
                raise UserError("the healing data has no text and no conversation with an assistant turn; "
                                "check the 'messages' roles")
            epoch += 1

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [n, seq_len] int32, position_ids [n, seq_len] int32, mask [n, seq_len] bool)``."""
        L = self.seq_len
        ids = torch.empty(n, L, dtype=torch.int32)
        pos = torch.empty(n, L, dtype=torch.int32)
        mask = torch.empty(n, L, dtype=torch.bool)
        done: list[tuple] = []
        open_: list[list] = []  # [ids, pos, mask, filled] of the windows being filled, oldest first

        def put(window: list, piece_ids: torch.Tensor, piece_mask: torch.Tensor) -> None:
            f, k = window[3], len(piece_ids)
            window[0][f : f + k], window[1][f : f + k], window[2][f : f + k] = piece_ids, torch.arange(k), piece_mask
            window[3] += k
            if window[3] == L:
                open_[:] = [w for w in open_ if w is not window]
                done.append(tuple(window[:3]))

        pieces = self._pieces()
        while len(done) < n:
            piece_ids, piece_mask = next(pieces)
            while len(piece_ids):
                window = next((w for w in open_ if L - w[3] >= len(piece_ids)), None)
                if window is None and len(piece_ids) < L and len(open_) >= OPEN_WINDOWS:  # fill the oldest with its end
                    room = L - open_[0][3]
                    put(open_[0], piece_ids[-room:], piece_mask[-room:])
                    piece_ids, piece_mask = piece_ids[:-room], piece_mask[:-room]
                    continue
                if window is None:
                    window = [torch.empty(L, dtype=torch.int32), torch.empty(L, dtype=torch.int32),
                              torch.empty(L, dtype=torch.bool), 0]
                    open_.append(window)
                put(window, piece_ids, piece_mask)
                piece_ids = piece_ids[:0]
        for row, (w_ids, w_pos, w_mask) in enumerate(done[:n]):
            ids[row], pos[row], mask[row] = w_ids, w_pos, w_mask
        return ids, pos, mask


@dataclass
class HealWindows:
    """A heal run's tokens: the training windows of the whole plan and the gate's dev windows (disjoint
    documents where there are enough of them)."""

    ids: torch.Tensor  # [N, T] training windows, in plan order
    positions: torch.Tensor  # [N, T] restarting at every document start
    mask: torch.Tensor  # [N, T] which next tokens are targets
    mask_mode: str
    dev_ids: torch.Tensor
    dev_positions: torch.Tensor
    dev_held_out: bool

    @classmethod
    def build(cls, records: list, tokenizer, seq_len: int, sequences: int, dev_fraction: float, dev_windows: int,
              seed: int) -> "HealWindows":
        train, dev = split_dev(records, dev_fraction, seed)
        stream = PackedStream(train, tokenizer, seq_len, seed)
        ids, positions, mask = stream.take(sequences)
        dev_ids, dev_positions, _ = PackedStream(dev or train, tokenizer, seq_len, seed + 1).take(dev_windows)
        return cls(ids, positions, mask, stream.mode, dev_ids, dev_positions, bool(dev))

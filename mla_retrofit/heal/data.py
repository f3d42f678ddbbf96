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

Documents are concatenated in a seeded random order and cut into windows of
exactly ``seq_len`` tokens (no padding, no token dropped: a long document runs
on into the next windows). Each window carries ``position_ids`` that restart at
0 at every document start and at the window start; with no attention mask and
no cache, transformers turns those into a block-diagonal causal mask, so no
token attends across a document border. When the data runs out the order is
reshuffled and the data repeats. The stream is a pure function of (records,
tokenizer, seq_len, seed), which makes resuming exact.
"""

from __future__ import annotations

import torch

from ..errors import UserError


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

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [n, seq_len] int32, position_ids [n, seq_len] int32, mask [n, seq_len] bool)``."""
        need, L = n * self.seq_len, self.seq_len
        ids = torch.empty(need, dtype=torch.int32)
        pos = torch.empty(need, dtype=torch.int32)
        mask = torch.empty(need, dtype=torch.bool)
        filled, epoch = 0, 0
        while filled < need:
            before = filled
            for i in self._order(epoch):
                rid, rmask = self._encoded(i)
                done = 0
                while done < len(rid) and filled < need:  # a document may span several windows
                    k = min(len(rid) - done, need - filled, L - filled % L)
                    ids[filled : filled + k] = rid[done : done + k]
                    mask[filled : filled + k] = rmask[done : done + k]
                    pos[filled : filled + k] = torch.arange(k, dtype=torch.int32)
                    filled, done = filled + k, done + k
                if filled == need:
                    break
            if filled == before:
                raise UserError("the healing data has no text and no conversation with an assistant turn; "
                                "check the 'messages' roles")
            epoch += 1
        self.epochs = epoch
        return ids.view(n, L), pos.view(n, L), mask.view(n, L)

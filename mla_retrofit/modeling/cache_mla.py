"""The latent KV cache layer of the retrofitted MLA model (shipped inside every converted checkpoint).

Imports only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class LatentCacheLayer(DynamicLayer):
    """``DynamicLayer`` for the one latent tensor, written in place.

    ``DynamicLayer`` grows by ``torch.cat`` and so copies the whole cache at every decode step, which costs
    more than the attention that reads it. This layer writes new tokens into a buffer instead:

    * it grows by 1/32 of its length at a time: at most ~3% head-room, and a decode step copies ~32 tokens
      on average instead of the whole cache;
    * under ``generate()`` growth stops at the run's length (``capacity``), so a generation that runs to its
      length holds exactly the bytes of its tokens, and one that stops early holds at most ~3% more (the
      buffer is never sized ahead for tokens that may not come).

    ``keys`` is always a view of exactly the tokens held. When anything outside ``update`` replaces ``keys``
    (beam reordering, batch selection, offloading) the next ``update`` adopts the new tensor; when gradients
    flow into the cache it falls back to ``torch.cat`` (in-place writes would break autograd).
    """

    def __init__(self, capacity: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self._buffer: torch.Tensor | None = None

    def _owns_keys(self) -> bool:
        buf, keys = self._buffer, self.keys
        return (
            buf is not None
            and keys is not None
            and keys.dim() == buf.dim()
            and keys.data_ptr() == buf.data_ptr()
            and keys.stride() == buf.stride()
            and keys.shape[:-2] == buf.shape[:-2]
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad or self.keys.requires_grad:
            self._buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if self._owns_keys() and n + t <= self._buffer.shape[-2]:
            self._buffer[..., n : n + t, :].copy_(key_states)
            self.keys = self._buffer[..., : n + t, :]
        elif n == 0:
            self._buffer = self.keys = key_states.contiguous()
        else:
            size = n + t
            capacity = size + -(-size // 32)
            if self.capacity and self.capacity >= size:
                capacity = min(capacity, self.capacity)
            buf = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            buf[..., :n, :].copy_(self.keys)
            buf[..., n:size, :].copy_(key_states)
            self._buffer, self.keys = buf, buf[..., :size, :]
        self.values = torch.cat([self.values, value_states], dim=-2)  # zero-width: no bytes move
        return self.keys, self.values

    def reset(self) -> None:
        self._buffer = None
        super().reset()


def use_latent_layers(cache: Cache | None, capacity: int | None = None) -> None:
    """Give a plain ``DynamicCache`` (what ``generate()`` and ``forward()`` make) in-place latent layers."""
    if not isinstance(cache, DynamicCache):
        return
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = LatentCacheLayer(capacity)
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = LatentCacheLayer

"""The attention mask a model's own full forward builds, from transformers' masking utilities.

Heal (the student's layers run one by one) and the export check (native and DeepSeek-V3 layers run one by
one) call layers directly, so they build the mask the model's forward would have built.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def causal_mask(config, x: torch.Tensor, positions: torch.Tensor):
    """The mask the model's full forward would build for an unpadded batch (None: plain causal SDPA)."""
    fn = create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    return fn(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)

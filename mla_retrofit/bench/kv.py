"""KV-cache accounting: analytic bytes per token from a config, and bytes really held by a cache object."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architectures import is_mla



def cache_values_per_layer(config) -> list[int]:
    """Values cached per token in each layer: ``r_l + d_R,l`` for MLA (native or DeepSeek), ``2 * n_kv * h`` for
    GQA/MHA (the cache transformers' DeepSeek-V3 itself allocates is larger: it expands the latent)."""
    if is_mla(config):
        return config.cache_values_per_token()
    if getattr(config, "kv_lora_rank", None):  # DeepSeek-V2/V3 (our export): latent + shared RoPE key
        return [config.kv_lora_rank + config.qk_rope_head_dim] * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [2 * config.num_key_value_heads * head_dim] * config.num_hidden_layers


def analytic_bytes(config, tokens: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    return sum(cache_values_per_layer(config)) * tokens * batch * dtype_bytes


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers ``Cache`` holds (keys and values of each layer)."""
    out = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def measured_bytes(cache) -> int:
    """Bytes of storage held by ``cache``: each distinct storage counted once, whole (not the viewed slice)."""
    seen, total = set(), 0
    for t in cache_tensors(cache):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


@dataclass
class GenerateMeasurement:
    prompt_tokens: int
    new_tokens: int
    cached_tokens: int
    batch: int
    measured_bytes: int
    analytic_bytes: int


@torch.no_grad()
def measure_generate(model, input_ids: torch.Tensor, new_tokens: int, attention_mask=None) -> GenerateMeasurement:
    """Greedy ``generate()`` and the bytes its cache holds afterwards, next to the analytic figure."""
    out = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, return_dict_in_generate=True, use_cache=True,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    cache = out.cache
    cached = cache.get_seq_length()
    dtype_bytes = next(model.parameters()).element_size()
    return GenerateMeasurement(
        prompt_tokens=input_ids.shape[1], new_tokens=out.sequences.shape[1] - input_ids.shape[1],
        cached_tokens=cached, batch=input_ids.shape[0], measured_bytes=measured_bytes(cache),
        analytic_bytes=analytic_bytes(model.config, cached, input_ids.shape[0], dtype_bytes),
    )


def largest_fit(config, memory_bytes: int, weights: int, dtype_bytes: int, context: int | None = None, batch: int | None = None) -> int:
    """Largest batch (given ``context``) or context (given ``batch``) whose cache fits beside the weights."""
    free = memory_bytes - weights
    per_token = sum(cache_values_per_layer(config)) * dtype_bytes
    if free <= 0:
        return 0
    if context is not None:
        return free // (per_token * context)
    return free // (per_token * (batch or 1))


def parse_size(text: str) -> int:
    """``80GB`` / ``24GiB`` / ``1.5GB`` -> bytes (GB = 10^9, GiB = 2^30; ``Gb`` is gigabits), by accelerate's parser."""
    from accelerate.utils import convert_file_size_to_int

    size = convert_file_size_to_int(text.strip().replace(" ", ""))
    if size < 0:
        raise ValueError(f"'{text}' has no unit")
    return size


def parse_tokens(text: str) -> list[int]:
    """``4k,32k,128k`` -> [4096, 32768, 131072]."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        out.append(int(float(p[:-1]) * 1024) if p.endswith("k") else int(p))
    return out

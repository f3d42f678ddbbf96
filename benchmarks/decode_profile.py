"""Where a decode step's time goes: GQA vs absorbed MLA, SmolLM2-135M's shape, random weights.

    python benchmarks/decode_profile.py [--context 8192] [--steps 12]

Part 1 times whole decode steps and, with forward hooks, the attention modules inside them, for each
model's default dynamic cache and for preallocated static caches (the MLA model at half the cache:
rank 128 + 64 RoPE dims per layer, against 3 KV heads x 64 x 2 = 384 values).
Part 2 times the attention kernels alone over 30 layers' worth of cache (so the cache comes from
memory, not from the CPU caches): torch SDPA for GQA, and for MLA the two matmuls of the absorbed
form in the order the runtime uses (latent @ q^T) and the other (q @ latent^T).
Speed does not depend on the weights' values, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from mla_retrofit.modeling.configuration_mla import MLARetrofitConfig
from mla_retrofit.modeling.modeling_mla import MLARetrofitForCausalLM

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             head_dim=64, max_position_embeddings=32768, tie_word_embeddings=True)


def models():
    torch.manual_seed(0)
    gqa = LlamaForCausalLM(LlamaConfig(num_key_value_heads=3, **SHAPE)).eval()
    mla = MLARetrofitForCausalLM(MLARetrofitConfig(kv_groups=3, num_key_value_heads=3, kv_lora_ranks=[128] * 30,
                                                   rope_freq_idx=[list(range(32))] * 30, **SHAPE)).eval()
    for m in (gqa, mla):
        m.config._attn_implementation = "sdpa"
    return gqa, mla


@torch.no_grad()
def step_times(model, context: int, steps: int, cache_kind: str) -> tuple[float, float]:
    spent = {"attention": 0.0}

    def pre(*_):
        spent["t0"] = time.perf_counter()

    def post(*_):
        spent["attention"] += time.perf_counter() - spent["t0"]

    hooks = [h for layer in model.model.layers
             for h in (layer.self_attn.register_forward_pre_hook(pre), layer.self_attn.register_forward_hook(post))]
    ids = torch.randint(0, SHAPE["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 2) if cache_kind == "static" else None
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    total, attention = [], []
    for _ in range(steps + 1):
        spent["attention"] = 0.0
        t0 = time.perf_counter()
        token = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        total.append(time.perf_counter() - t0)
        attention.append(spent["attention"])
    for h in hooks:
        h.remove()
    return statistics.median(total[1:]) * 1e3, statistics.median(attention[1:]) * 1e3


def kernels(context: int, repeats: int = 5) -> dict[str, float]:
    layers, rank, width, heads = 30, 128, 192, 9
    latents = [torch.randn(1, 1, context, width) for _ in range(layers)]
    keys = [torch.randn(1, 3, context, 64) for _ in range(layers)]
    values = [torch.randn(1, 3, context, 64) for _ in range(layers)]
    q_mla, q_gqa = torch.randn(1, 1, heads, width), torch.randn(1, heads, 1, 64)

    def mla_latent_left(i):
        lat = latents[i]
        s = torch.matmul(lat, q_mla.transpose(-1, -2)).transpose(-1, -2).contiguous()
        return torch.matmul(torch.softmax(s, -1), lat[..., :rank])

    def mla_query_left(i):
        lat = latents[i]
        return torch.matmul(torch.softmax(torch.matmul(q_mla, lat.transpose(-1, -2)), -1), lat[..., :rank])

    def gqa_sdpa(i):
        return F.scaled_dot_product_attention(q_gqa, keys[i], values[i], enable_gqa=True)

    out = {}
    for name, fn in (("GQA: SDPA (enable_gqa)", gqa_sdpa), ("MLA: latent @ q^T, softmax, @ latent", mla_latent_left),
                     ("MLA: q @ latent^T, softmax, @ latent", mla_query_left)):
        for i in range(layers):
            fn(i)
        t0 = time.perf_counter()
        for _ in range(repeats):
            for i in range(layers):
                fn(i)
        out[name] = (time.perf_counter() - t0) / repeats * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    gqa, mla = models()
    print(f"decode step at context {args.context}, batch 1, float32, {torch.get_num_threads()} threads (median of {args.steps})")
    print(f"{'cache':8s} {'model':5s} {'step ms':>8s} {'attention ms':>13s} {'rest ms':>8s}")
    for kind in ("dynamic", "static"):
        for name, model in (("GQA", gqa), ("MLA", mla)):
            total, attention = step_times(model, args.context, args.steps, kind)
            print(f"{kind:8s} {name:5s} {total:8.1f} {attention:13.1f} {total - attention:8.1f}", flush=True)
    print(f"\nattention kernels alone, 30 layers at context {args.context} (ms per decode step):")
    for name, ms in kernels(args.context).items():
        print(f"  {name:40s} {ms:6.1f}")


if __name__ == "__main__":
    main()

"""Measure the export against the native model, one layer of each in memory at a time.

Two hidden-state streams (native layers, DeepSeek layers) start from the same
token embeddings; after the last layer both go through their final norm and
head, and the per-token KL divergence of the next-token distributions is
reported. Both sides run in float32 from the weights as written.
"""

from __future__ import annotations

import torch

from ..masks import causal_mask
from ..metrics import kl_per_token, top1_agreement
from ..modeling.configuration_mla import MLARetrofitConfig
from ..modeling.modeling_mla import MLARetrofitDecoderLayer, MLARetrofitRMSNorm, MLARetrofitRotaryEmbedding


class StreamCheck:
    """Feed it each layer's native and exported weights in order, then :meth:`finish` with the heads."""

    def __init__(self, native_cfg: MLARetrofitConfig, ds_cfg, ids: torch.Tensor, embed: torch.Tensor,
                 resid_scale: float = 1.0):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        self.native_cfg, self.ds_cfg = native_cfg, ds_cfg
        native_cfg._attn_implementation = "eager"
        ds_cfg._attn_implementation = "eager"
        self.ids = ids
        x = embed.float()[ids]
        self.native_h, self.ds_h = x.clone(), x * resid_scale  # the export may scale its residual stream
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        self.pos = pos
        self.mask = causal_mask(native_cfg, x, pos)
        self.native_pe = MLARetrofitRotaryEmbedding(native_cfg)(x, pos)
        self.ds_pe = DeepseekV3RotaryEmbedding(ds_cfg)(x, pos)

    @torch.no_grad()
    def layer(self, i: int, native_state: dict, ds_state: dict) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

        nat = MLARetrofitDecoderLayer(self.native_cfg, i).eval()
        nat.load_state_dict({k: v.float() for k, v in native_state.items()}, strict=True)
        self.native_h = nat(self.native_h, attention_mask=self.mask, position_embeddings=self.native_pe)
        ds = DeepseekV3DecoderLayer(self.ds_cfg, i).eval()
        ds.load_state_dict({k: v.float() for k, v in ds_state.items()}, strict=True)
        self.ds_h = ds(self.ds_h, attention_mask=self.mask, position_ids=self.pos, position_embeddings=self.ds_pe)

    @torch.no_grad()
    def finish(self, native_norm, native_head, ds_norm, ds_head) -> dict:
        logits = []
        for h, nw, head, eps in ((self.native_h, native_norm, native_head, self.native_cfg.rms_norm_eps),
                                 (self.ds_h, ds_norm, ds_head, self.ds_cfg.rms_norm_eps)):
            norm = MLARetrofitRMSNorm(nw.numel(), eps)
            norm.weight.data.copy_(nw.float())
            logits.append(norm(h) @ head.float().T)
        return compare_logits(logits[0], logits[1])


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Per-token ``KL(ref || got)`` (mean, max), top-1 agreement and max |logit diff|."""
    kl = kl_per_token(got, ref, torch.float64).flatten()
    return {
        "tokens": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1_agreement(got, ref).mean()),
        "max_abs_logit_diff": float((ref.double() - got.double()).abs().max()),
    }

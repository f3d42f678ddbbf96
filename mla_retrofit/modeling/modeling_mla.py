"""Retrofitted Multi-head Latent Attention (MLA) causal LM, in the order it runs.

Shipped inside every converted checkpoint (``auto_map``): imports only torch,
transformers and its sibling files (configuration, latent cache, norm and RoPE).

Per layer and token the cache holds one tensor ``[c ; k_R]`` of ``r + d_R``
values (``c``: latent, ``k_R``: the RoPE key shared by all heads); nothing
else. Attention scores are ``q_i . (W_uk,g c) + RoPE(Q_R,g q_i) . k_R``,
scaled by ``head_dim ** -0.5`` like the source model, and values are
``W_uv,g c``.

* Prefill and training expand the latent into per-group keys/values and go
  through the transformers attention registry (eager, SDPA, flash-attn).
* Short queries against a cache (decode) use the absorbed form: the query is
  pulled into latent space (``W_uk,g^T q_i``), all heads attend to the one
  cached tensor as a single head, and ``W_uv,g`` is applied after.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .cache_mla import LatentCacheLayer, use_latent_layers  # noqa: F401  (LatentCacheLayer: re-exported)
from .configuration_mla import MLARetrofitConfig
from .rope_mla import MLARetrofitRMSNorm, MLARetrofitRotaryEmbedding, apply_rope, rotate_half  # noqa: F401


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Add a float mask, or fill where a boolean mask is False."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = module.num_key_value_groups
    key = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    value = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    attn_weights = apply_mask(torch.matmul(query, key.transpose(2, 3)) * scaling, attention_mask)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MLARetrofitAttention(nn.Module):
    """MLA attention with a per-layer latent rank and per-layer kept RoPE frequencies."""

    def __init__(self, config: MLARetrofitConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_groups = config.kv_groups
        self.num_key_value_groups = self.num_heads // self.kv_groups
        self.head_dim = config.head_dim
        self.rank = config.kv_lora_ranks[layer_idx]
        self.rope_dim = 2 * len(config.rope_freq_idx[layer_idx])
        self.rope_idx = nn.Buffer(self.rope_index(), persistent=False)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        n_kv_dim = config.num_key_value_heads * self.head_dim

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.q_norm = MLARetrofitRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        if config.latent_input == "normed_keys":
            self.k_proj = nn.Linear(config.hidden_size, n_kv_dim, bias=config.attention_bias)
            self.v_proj = nn.Linear(config.hidden_size, n_kv_dim, bias=config.attention_bias)
            self.k_norm = MLARetrofitRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
            latent_in = 2 * n_kv_dim
        else:
            latent_in = config.hidden_size
        self.kv_a_proj = nn.Linear(latent_in, self.rank + self.rope_dim, bias=config.kv_a_bias)
        # Per group: the map from a query head to its RoPE query, and the latent up-projections.
        self.q_rope = nn.Parameter(torch.zeros(self.kv_groups, self.rope_dim, self.head_dim))
        self.k_up = nn.Linear(self.rank, self.kv_groups * self.head_dim, bias=False)
        self.v_up = nn.Linear(self.rank, self.kv_groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    def rope_index(self) -> torch.Tensor:
        """Positions of this layer's kept frequencies in the full half-split cos/sin table."""
        freq_idx = torch.tensor(self.config.rope_freq_idx[self.layer_idx], dtype=torch.long)
        return torch.cat([freq_idx, freq_idx + self.head_dim // 2])

    # -- pieces -----------------------------------------------------------------------------------
    def latent_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.latent_input == "hidden":
            return hidden_states
        b, t, _ = hidden_states.shape
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return torch.cat([k.reshape(b, t, -1), self.v_proj(hidden_states)], dim=-1)

    def queries(self, hidden_states, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # [B, H, T, h]
        q_rope = self.per_group(q, self.q_rope.transpose(1, 2))  # [B, H, T, d_R]
        return q, apply_rope(q_rope, cos, sin)

    def per_group(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x[:, i] @ w[group(i)]`` for every query head ``i``: ``x`` is ``[B, H, T, a]``, ``w`` is ``[G, a, z]``.
        The heads of a group are adjacent, so this is one batched matmul and the weights are never repeated."""
        b, h, t, a = x.shape
        y = torch.matmul(x.reshape(b, self.kv_groups, (h // self.kv_groups) * t, a), w)
        return y.view(b, h, t, w.shape[-1])

    def latent(self, hidden_states, cos, sin) -> torch.Tensor:
        """The per-token cache entry ``[c ; RoPE(k_R)]`` as ``[B, 1, T, r + d_R]``."""
        ckr = self.kv_a_proj(self.latent_input(hidden_states)).unsqueeze(1)
        c, k_r = ckr.split([self.rank, self.rope_dim], dim=-1)
        return torch.cat([c, apply_rope(k_r, cos, sin)], dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk`` and ``W_uv`` per group, ``[G, h, r]``."""
        shape = (self.kv_groups, self.head_dim, self.rank)
        return self.k_up.weight.view(shape), self.v_up.weight.view(shape)

    # -- the two attention forms ------------------------------------------------------------------
    def expanded(self, q, q_rope, latent, attention_mask, **kwargs) -> torch.Tensor:
        b, _, s, _ = latent.shape
        c, k_r = latent.split([self.rank, self.rope_dim], dim=-1)
        k_nope = self.k_up(c).view(b, s, self.kv_groups, self.head_dim).transpose(1, 2)
        value = self.v_up(c).view(b, s, self.kv_groups, self.head_dim).transpose(1, 2)
        key = torch.cat([k_nope, k_r.expand(b, self.kv_groups, s, self.rope_dim)], dim=-1)
        query = torch.cat([q, q_rope], dim=-1)
        impl = self.config._attn_implementation
        interface: Callable = eager_attention_forward
        if impl != "eager":
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        # flash-attn, and torch's fused SDPA kernels, want equal q/k/v head dims: without the zero padding
        # SDPA falls back to its math kernel (6x slower at 8k context on CPU, measured).
        pad = impl not in (None, "eager") and self.rope_dim > 0
        if pad:
            value = F.pad(value, (0, self.rope_dim))
        out, _ = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        if pad:
            out = out[..., : self.head_dim]
        return out  # [B, T, H, h]

    def absorbed(self, q, q_rope, latent, attention_mask) -> torch.Tensor:
        b, h, t, _ = q.shape
        s = latent.shape[2]
        w_uk, w_uv = self.up_weights()
        q_abs = torch.cat([self.per_group(q, w_uk), q_rope], dim=-1)  # [B, H, T, r + d_R]
        # All heads read one cached tensor: fold heads into the query axis (one "head" of H*T queries).
        q_abs = q_abs.transpose(1, 2).reshape(b, 1, t * h, -1)
        mask = attention_mask
        if mask is None and t > 1:  # only when forced (attn_mode="absorbed"): a dynamic cache, queries last
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)[None, None]
        if mask is not None:
            mask = mask[:, :, -t:, :].repeat_interleave(h, dim=2)
        # Two plain matmuls: faster than SDPA here (SDPA copies the strided value view; 2x at 4k on CPU). The
        # scores are computed as latent @ q^T, so the long latent streams as the left operand (1.5x faster on
        # CPU than q @ latent^T, measured), then laid out [B, 1, T*H, S] for the softmax.
        scores = torch.matmul(latent, (q_abs * self.scaling).transpose(-1, -2)).transpose(-1, -2).contiguous()
        scores = apply_mask(scores, mask)  # [B, 1, T*H, S]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        ctx = torch.matmul(probs, latent[..., : self.rank])  # [B, 1, T*H, r]
        ctx = ctx.view(b, t, self.kv_groups, h // self.kv_groups, self.rank)
        return torch.einsum("btgjr,gdr->btgjd", ctx, w_uv).reshape(b, t, h, self.head_dim)  # [B, T, H, h]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        b, t, _ = hidden_states.shape
        cos, sin = position_embeddings
        cos, sin = cos[..., self.rope_idx], sin[..., self.rope_idx]
        q, q_rope = self.queries(hidden_states, cos, sin)
        latent = self.latent(hidden_states, cos, sin)
        if cache is not None:
            latent, _ = cache.update(latent, latent[..., :0], self.layer_idx)
        mode = getattr(self, "attn_mode", "auto")
        # Shapes only (no cache lengths, which are tensors in a static cache, so torch.compile traces this):
        # short queries against a cache holding more positions than the query use the absorbed form. Without
        # a mask, several queries are a static cache's prefill: SDPA's causal flag (expanded form) fits that.
        use_absorbed = mode == "absorbed" or (
            mode == "auto" and latent.shape[2] > t and t <= self.config.absorb_max_q_len and not self.training
            and (t == 1 or attention_mask is not None)
        )
        if use_absorbed:
            out = self.absorbed(q, q_rope, latent, attention_mask)
        else:
            out = self.expanded(q, q_rope, latent, attention_mask, **kwargs)
        return self.o_proj(out.reshape(b, t, -1)), None


class MLARetrofitMLP(nn.Module):
    def __init__(self, config: MLARetrofitConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLARetrofitDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MLARetrofitConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLARetrofitAttention(config, layer_idx)
        self.mlp = MLARetrofitMLP(config)
        self.input_layernorm = MLARetrofitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MLARetrofitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MLARetrofitPreTrainedModel(PreTrainedModel):
    config_class = MLARetrofitConfig
    config: MLARetrofitConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLARetrofitDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MLARetrofitAttention):
            init.normal_(module.q_rope, 0.0, self.config.initializer_range)
            init.copy_(module.rope_idx, module.rope_index())
        elif isinstance(module, MLARetrofitRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config)[0])


class MLARetrofitModel(MLARetrofitPreTrainedModel):
    def __init__(self, config: MLARetrofitConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MLARetrofitDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MLARetrofitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MLARetrofitRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("output_attentions", None), kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        use_latent_layers(cache)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        mask_fn = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                cache=cache,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class MLARetrofitForCausalLM(MLARetrofitPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLARetrofitConfig):
        super().__init__(config)
        self.model = MLARetrofitModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """As ``GenerationMixin``'s, then the cache's layers become in-place latent layers that never grow
        past the run's length (``max_cache_length``)."""
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        capacity = kwargs.get("max_cache_length", args[-1] if args and isinstance(args[-1], int) else None)
        use_latent_layers(model_kwargs.get("cache"), capacity)
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["MLARetrofitForCausalLM", "MLARetrofitModel", "MLARetrofitPreTrainedModel"]

"""Configuration of a retrofitted Multi-head Latent Attention (MLA) causal LM.

This file is shipped inside every converted checkpoint (``auto_map``), so it
imports only ``transformers``.
"""

from transformers import PretrainedConfig


class MLARetrofitConfig(PretrainedConfig):
    """Decoder-only LM whose attention caches one latent ``c`` and one RoPE key ``k_R`` per token.

    Per layer ``l``: ``kv_lora_ranks[l]`` is the latent rank ``r_l`` and
    ``rope_freq_idx[l]`` lists, for every kept RoPE pair, the index ``t`` of
    its frequency in the original head's frequency table (so ``d_R,l =
    2 * len(rope_freq_idx[l])``). The cache holds ``r_l + d_R,l`` values per
    token per layer.

    ``latent_input`` is ``"hidden"`` (``[c; k_R] = W_a x + b_a``) or
    ``"normed_keys"`` (Qwen3: the original ``k_proj``/``k_norm``/``v_proj``
    run first and ``[c; k_R] = W_a [k_norm(k); v] + b_a``).

    ``kv_groups`` is the number of groups sharing one key/value up-projection
    (the source's KV heads; equal to ``num_attention_heads`` once untied).
    """

    model_type = "mla_retrofit"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 512,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        kv_groups: int = 2,
        head_dim: int = 64,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        kv_a_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        latent_input: str = "hidden",
        num_key_value_heads: int | None = None,
        kv_lora_ranks: list | None = None,
        rope_freq_idx: list | None = None,
        sliding_window: int | None = None,
        absorb_max_q_len: int = 16,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id=None,
        source_model: str | None = None,
        source_model_type: str | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_groups = kv_groups
        # The source's KV heads; kept for tooling that reads the standard key.
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else kv_groups
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.kv_a_bias = kv_a_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        if latent_input not in ("hidden", "normed_keys"):
            raise ValueError(f"latent_input must be 'hidden' or 'normed_keys', got {latent_input!r}")
        self.latent_input = latent_input
        half = head_dim // 2
        self.kv_lora_ranks = list(kv_lora_ranks) if kv_lora_ranks is not None else [head_dim] * num_hidden_layers
        self.rope_freq_idx = (
            [list(x) for x in rope_freq_idx] if rope_freq_idx is not None else [list(range(half))] * num_hidden_layers
        )
        if len(self.kv_lora_ranks) != num_hidden_layers or len(self.rope_freq_idx) != num_hidden_layers:
            raise ValueError("kv_lora_ranks and rope_freq_idx need one entry per layer")
        self.sliding_window = sliding_window
        self.absorb_max_q_len = absorb_max_q_len
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.source_model = source_model
        self.source_model_type = source_model_type
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def cache_values_per_token(self) -> list[int]:
        """Values cached per token for every layer: ``r_l + d_R,l``."""
        return [r + 2 * len(f) for r, f in zip(self.kv_lora_ranks, self.rope_freq_idx)]


__all__ = ["MLARetrofitConfig"]

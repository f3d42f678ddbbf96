"""mla-retrofit: retrofit grouped-query-attention checkpoints with Multi-head Latent Attention."""

__version__ = "0.1.0"

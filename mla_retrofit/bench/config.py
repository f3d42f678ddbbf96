"""What ``bench`` is asked to measure: :class:`BenchConfig`, validated once at the edge.

Every field is a ``bench`` flag and a key of its ``--config`` file; the CLI passes only what was typed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .. import dtypes
from ..errors import UserError
from ..typed import Config


def flash_attn_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class BenchConfig(Config):
    model: str
    baseline: str | None = None  # None: the conversion's source model
    kv_report: bool = True
    fidelity: bool = True
    speed: bool = True
    contexts: str = "4k,32k,128k"  # the KV table's context lengths
    batches: str = "1,8"  # and batch sizes
    dtype: str = "bf16"  # cache dtype of the KV table
    memory: str = "80GB"  # for the "what fits" rows
    text: str = "builtin-eval"
    eval_samples: int = Field(16, ge=1)
    eval_seq_len: int = Field(512, ge=2)
    speed_contexts: str = "4k,8k"
    speed_batch: int = Field(1, ge=1)
    speed_cache: str = "dynamic"
    decode_steps: int = Field(8, ge=1)
    decode_rounds: int = Field(3, ge=1)
    generate_tokens: int = Field(16, ge=1)
    threads: int | None = Field(None, ge=1)
    device: str = "auto"  # auto: cuda when available, else cpu
    weights_dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    attn: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: flash-attn on cuda when installed
    tasks: str = ""  # comma list of executed task benchmarks (humaneval); model and baseline on the same problems
    task_limit: int | None = Field(None, ge=1)  # the first N problems of each task (None: all)
    task_max_tokens: int = Field(384, ge=1)  # greedy tokens per completion
    task_batch: int = Field(8, ge=1)  # prompts generated together (batched by length)
    task_timeout: float = Field(10.0, gt=0)  # seconds per program in the sandbox

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    @model_validator(mode="after")
    def _checked(self):
        self.validate()
        return self

    def validate(self) -> None:
        """Checks that need more than a type: devices, dtype spellings, size and token lists."""
        from . import kv, speed

        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda[:N] (got {self.device})")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {self.device}: no CUDA device is visible here; use --device cpu")
        object.__setattr__(self, "weights_dtype", dtypes.canonical(self.weights_dtype, "--weights-dtype", auto=True))
        if self.attn == "flash_attention_2" and not flash_attn_available():
            raise UserError("--attn flash_attention_2 needs flash-attn: pip install 'mla-retrofit[flash]' (CUDA only)")
        dtypes.cache_bytes(self.dtype)
        from .tasks import TASKS

        unknown = [t for t in self.task_names if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task '{unknown[0]}' for --tasks; choose from {', '.join(TASKS)}")
        for name, flag in (("contexts", "--context"), ("batches", "--batch"), ("speed_contexts", "--speed-context")):
            try:
                kv.parse_tokens(getattr(self, name))
            except ValueError as e:
                raise UserError(f"{flag} must be a comma list like 4k,32k ({e})") from e
        bad = [c for c in self.speed_cache.split(",") if c.strip() not in speed.SPEED_MODES]
        if bad:
            raise UserError(f"--speed-cache must be a comma list of {', '.join(speed.SPEED_MODES)} "
                            f"(got {', '.join(bad)})")
        try:
            kv.parse_size(self.memory)
        except ValueError as e:
            raise UserError(f"--memory must look like 80GB or 24GiB ({e})") from e

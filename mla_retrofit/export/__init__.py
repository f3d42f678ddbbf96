"""Export native MLA checkpoints to formats other runtimes load (DeepSeek-V3 for transformers/vLLM/SGLang, GGUF for llama.cpp).

The exporters are imported on first use, so reading :class:`ExportConfig` (the CLI does, for its help) needs no torch.
"""

from __future__ import annotations

import importlib

from .config import ExportConfig

__all__ = ["ExportConfig", "ExportReport", "GGUFReport", "export", "export_deepseek", "export_gguf"]
_LAZY = {"ExportReport": ".settings", "DeepseekExporter": ".deepseek", "export_deepseek": ".deepseek",
         "GGUFReport": ".gguf", "export_gguf": ".gguf"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export(cfg: ExportConfig):
    """Run the export ``cfg`` asks for: a GGUF (``GGUFReport``) or a DeepSeek-V3 directory (``ExportReport``)."""
    if cfg.format == "gguf":
        from .gguf import export_gguf

        return export_gguf(cfg.model, cfg.output, cfg.outtype, cfg.overwrite, tokenizer_gguf=cfg.tokenizer_gguf,
                           pad_ranks=cfg.pad_ranks, verify_tokens=cfg.verify_tokens)
    from .deepseek import DeepseekExporter

    return DeepseekExporter(cfg).run()

"""Export native MLA checkpoints to formats other runtimes load (DeepSeek-V3 for transformers/vLLM/SGLang)."""

from .deepseek import ExportConfig, ExportReport, export_deepseek

__all__ = ["ExportConfig", "ExportReport", "export_deepseek"]

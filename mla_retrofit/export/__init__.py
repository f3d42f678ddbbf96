"""Export native MLA checkpoints to formats other runtimes load (DeepSeek-V3 for transformers/vLLM/SGLang, GGUF for llama.cpp)."""

from .deepseek import ExportConfig, ExportReport, export_deepseek
from .gguf import GGUFReport, export_gguf

__all__ = ["ExportConfig", "ExportReport", "GGUFReport", "export_deepseek", "export_gguf"]

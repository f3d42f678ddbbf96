"""What a conversion reports: per-layer results, ``conversion.json`` and the model card."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__


@dataclass
class LayerReport:
    layer: int
    rank: int
    rope_dim: int
    kept_pairs: list
    retained_energy: float
    key_error: float
    value_error: float
    attn_error: float
    alpha: float | None = None
    rope_cost_kept: float | None = None
    value_fit: str | None = None
    # rank allocation by sensitivity: end-to-end KL per unit of relative attention-output error, and the layer's
    # predicted share of the KL at its rank (by its spectrum) and measured one (by its measured attention error)
    sensitivity: float | None = None
    predicted_error: float | None = None
    predicted_kl: float | None = None
    measured_kl: float | None = None
    # the closed-form o_proj refit (refit_output): relative error of its target (the source's residual stream
    # after this attention, reached from the converted model's own inputs) on the calibration windows, before/after
    output_error: float | None = None
    output_error_refit: float | None = None


@dataclass
class ConversionResult:
    output: str
    layers: list[LayerReport] = field(default_factory=list)
    kv_original: int = 0
    kv_converted: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def kv_ratio(self) -> float:
        return self.kv_converted / self.kv_original


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: ``ru_maxrss`` also counts the parent's memory
    when the process was started by ``vfork`` + ``exec`` (Python's ``subprocess`` does that), which made a
    child converter look as large as the script that launched it.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conversion_record(conv, result: ConversionResult, mla_cfg) -> dict:
    """What ``conversion.json`` holds: source, settings, budget, per-layer report, cost, machine, notes."""
    return {
        "mla_retrofit_version": __version__,
        "source_model": conv.cfg.model,
        "source_model_type": conv.config.model_type,
        "config": conv.cfg.as_dict(),
        "budget": asdict(conv.budget),
        "kv_values_per_token": {"original": result.kv_original, "converted": result.kv_converted,
                                "ratio": result.kv_ratio},
        "cache_values_per_layer": mla_cfg.cache_values_per_token(),
        "layers": [asdict(r) for r in result.layers],
        "seconds": round(result.seconds, 1),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpus": torch.get_num_threads()},
        "notes": conv.notes,
    }


def model_card(conv, result: ConversionResult) -> str:
    cfg = conv.cfg
    ranks = [r.rank for r in result.layers]
    return (
        f"# MLA retrofit of {cfg.model}\n\n"
        f"Converted with mla-retrofit {__version__} (method `{cfg.method}`, rank allocation `{cfg.rank_allocation}`).\n\n"
        f"- KV cache per token: {result.kv_converted} values vs {result.kv_original} originally "
        f"({result.kv_ratio:.3f}x)\n"
        f"- latent ranks per layer: {ranks}\n"
        f"- RoPE dims per layer: {conv.budget.rope_dim}\n"
        f"- calibration: `{cfg.calib}`, {cfg.calib_samples} x {cfg.calib_seq_len} tokens\n\n"
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; the tokenizer with\n"
        "`PreTrainedTokenizerFast.from_pretrained(path)` (or `AutoTokenizer` with `trust_remote_code=True`).\n"
        "`conversion.json` holds the per-layer report and the exact settings.\n"
    )

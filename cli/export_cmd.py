"""``mla-retrofit export``: a native checkpoint -> DeepSeek-V3 (exact or engine form) or GGUF -> print the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mla_retrofit.export.config import ExportConfig

from .common import _plain, config_file_values, default_of, err_console, info, typed_flags, user_errors


def _d(name: str) -> str:
    return default_of(ExportConfig, name)


def export(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Native MLA checkpoint (from convert or heal); for gguf also an --engine export."),
    out: Path = typer.Argument(..., help="Output directory (deepseek) or .gguf file (gguf), written atomically."),
    format: Optional[str] = typer.Option(None, help="deepseek (stock DeepseekV3ForCausalLM, no remote code) | gguf "
                                                    f"(llama.cpp). {_d('format')}"),
    engine: Optional[bool] = typer.Option(None, "--engine", help="The form vLLM/SGLang/llama.cpp run: no biases, linear "
                                          "latent norm; exact for bias-free families converted with --no-centre."),
    biases: Optional[bool] = typer.Option(None, "--biases/--no-biases", help="--no-biases is the old name of --engine."),
    outtype: Optional[str] = typer.Option(None, help=f"gguf weight type: f32 | bf16 | f16 | q8_0. {_d('outtype')}"),
    tokenizer_gguf: Optional[str] = typer.Option(None, help="gguf: copy the tokenizer from this GGUF of the source model."),
    pad_ranks: Optional[bool] = typer.Option(None, "--pad-ranks", help="Zero-pad per-layer latent ranks to the largest "
                                                                       "(costs cache)."),
    flashmla: Optional[bool] = typer.Option(None, "--flashmla", help="Target kv_lora_rank 512 + qk_rope_head_dim 64 "
                                                                     "(FlashMLA)."),
    pad_rope: Optional[bool] = typer.Option(None, "--pad-rope", help="Allow empty RoPE table slots (costs cache)."),
    rope_interleave: Optional[bool] = typer.Option(None, "--rope-interleave/--no-rope-interleave",
                                                   help=f"Interleaved RoPE weights (vLLM/SGLang). {_d('rope_interleave')}"),
    yarn_rope: Optional[bool] = typer.Option(None, "--yarn-rope/--no-yarn-rope",
                                             help="Engine form: write plain RoPE as DeepSeek's yarn at factor 1 (the "
                                                  "same table; engines take their DeepSeek RoPE path). "
                                                  f"{_d('yarn_rope')}"),
    dtype: Optional[str] = typer.Option(None, help=f"deepseek weight dtype: auto | float32 | bfloat16. {_d('dtype')}"),
    verify_tokens: Optional[int] = typer.Option(None, help="Tokens for the native-vs-export KL check (0 = skip). "
                                                           f"{_d('verify_tokens')}"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace OUT if it exists."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with any of these options (flags win)."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
) -> None:
    """Export a native MLA checkpoint for a serving engine.

    Convert with --engine (the DeepSeek RoPE table, one rank for all layers, no latent bias) for an exact engine form.

    Examples:

      mla-retrofit export out/ out-deepseek/                    # exact, transformers (biases)

      mla-retrofit export out/ out-engine/ --engine             # vLLM / SGLang

      mla-retrofit export out/ model.gguf --format gguf --outtype q8_0     # llama.cpp (deepseek2)
    """
    from mla_retrofit.export import export as run_export

    with user_errors():
        names = set(ExportConfig.model_fields)
        values = {**config_file_values(config, names),
                  **typed_flags(ctx, names - {"model", "output"})}
        cfg = ExportConfig(model=str(model), output=str(out), **values)
        with err_console.status(f"exporting {cfg.format}"):
            rep = run_export(cfg)
        if cfg.format == "gguf":
            lines = [f"wrote {out}: deepseek2, {rep.outtype} {rep.tensor_types}, cache {rep.cache_values_per_token} "
                     f"values/token, tokenizer from {rep.tokenizer_from}"]
            lines += [rep.deepseek["fidelity_note"]] if rep.deepseek else []
        else:
            lines = [f"wrote {out}: cache {rep.cache_values_export} values/token (native {rep.cache_values_native}); "
                     f"breakdown {rep.cache_breakdown}", rep.fidelity_note]
        if json_out:
            typer.echo(json.dumps(_plain(rep), default=str))
            return
        for line in lines + [f"note: {n}" for n in rep.notes]:
            info(line)

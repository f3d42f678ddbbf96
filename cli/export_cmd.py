"""``mla-retrofit export``: a native checkpoint -> DeepSeek-V3 (exact or engine form) or GGUF -> print the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mla_retrofit.errors import UserError

from .main import _plain, app, err_console, info, user_errors


@app.command()
def export(
    model: Path = typer.Argument(..., help="Native MLA checkpoint (from convert or heal); for gguf also an --engine export."),
    out: Path = typer.Argument(..., help="Output directory (deepseek) or .gguf file (gguf), written atomically."),
    format: str = typer.Option("deepseek", help="deepseek (stock DeepseekV3ForCausalLM, no remote code) | gguf (llama.cpp)."),
    engine: bool = typer.Option(False, "--engine", help="The form vLLM/SGLang/llama.cpp run: no biases, linear latent "
                                "norm; exact for bias-free families converted with --no-centre."),
    biases: bool = typer.Option(True, "--biases/--no-biases", help="--no-biases is the old name of --engine."),
    outtype: str = typer.Option("f32", help="gguf weight type: f32 | bf16 | f16 | q8_0."),
    tokenizer_gguf: Optional[Path] = typer.Option(None, help="gguf: copy the tokenizer from this GGUF of the source model."),
    pad_ranks: bool = typer.Option(False, help="Zero-pad per-layer latent ranks to the largest (costs cache)."),
    flashmla: bool = typer.Option(False, help="Target kv_lora_rank 512 + qk_rope_head_dim 64 (FlashMLA)."),
    pad_rope: bool = typer.Option(False, help="Allow empty RoPE table slots (costs cache)."),
    rope_interleave: bool = typer.Option(True, "--rope-interleave/--no-rope-interleave", help="Interleaved RoPE weights (vLLM/SGLang)."),
    dtype: str = typer.Option("auto", help="deepseek weight dtype: auto | float32 | bfloat16"),
    verify_tokens: int = typer.Option(64, help="Tokens for the native-vs-export KL check (0 = skip)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
) -> None:
    """Export a native MLA checkpoint for a serving engine.

    Convert with --rope-layout deepseek --rank-allocation uniform (and --no-centre for an exact engine form).

    Examples:

      mla-retrofit export out/ out-deepseek/                    # exact, transformers (biases)

      mla-retrofit export out/ out-engine/ --engine             # vLLM / SGLang

      mla-retrofit export out/ model.gguf --format gguf --outtype q8_0     # llama.cpp (deepseek2)
    """
    from mla_retrofit.export import export_deepseek, export_gguf

    with user_errors():
        if format == "gguf":
            with err_console.status("exporting GGUF"):
                rep = export_gguf(str(model), str(out), outtype, overwrite, pad_ranks=pad_ranks,
                                  tokenizer_gguf=str(tokenizer_gguf) if tokenizer_gguf else None,
                                  verify_tokens=verify_tokens)
            lines = [f"wrote {out}: deepseek2, {rep.outtype} {rep.tensor_types}, cache {rep.cache_values_per_token} "
                     f"values/token, tokenizer from {rep.tokenizer_from}"]
            lines += [rep.deepseek["fidelity_note"]] if rep.deepseek else []
        elif format == "deepseek":
            with err_console.status("exporting"):
                rep = export_deepseek(str(model), str(out), pad_ranks=pad_ranks, flashmla=flashmla,
                                      overwrite=overwrite, pad_rope=pad_rope, biases=biases, engine=engine,
                                      rope_interleave=rope_interleave, dtype=dtype, verify_tokens=verify_tokens)
            lines = [f"wrote {out}: cache {rep.cache_values_export} values/token (native {rep.cache_values_native}); "
                     f"breakdown {rep.cache_breakdown}", rep.fidelity_note]
        else:
            raise UserError(f"unknown export format '{format}'; supported: deepseek, gguf")
        if json_out:
            typer.echo(json.dumps(_plain(rep), default=str))
            return
        for line in lines + [f"note: {n}" for n in rep.notes]:
            info(line)

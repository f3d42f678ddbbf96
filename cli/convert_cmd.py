"""``mla-retrofit convert``: one-shot GQA -> MLA conversion, and its report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mla_retrofit.convert.config import ConvertConfig

from . import state
from .common import VERBOSITY, config_file_values, console, default_of, err_console, info, progress_bar, typed_flags, user_errors


def _d(name: str) -> str:
    return default_of(ConvertConfig, name)


def convert(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hub id, local HF directory, .gguf file, or 'smollm2-135m-instruct'."),
    out: Path = typer.Argument(..., help="Output directory (written atomically)."),
    kv_ratio: Optional[float] = typer.Option(None, help="Cache size as a fraction of the original (0, 1]; 0.5 "
                                                          "unless --kv-dim or --rank is given."),
    kv_dim: Optional[int] = typer.Option(None, help="Cache values per token per layer (instead of --kv-ratio)."),
    rank: Optional[int] = typer.Option(None, help="Explicit uniform latent rank (instead of --kv-ratio; "
                                                  "with --rope-dim, default min(64, head_dim))."),
    rope_dim: Optional[int] = typer.Option(None, help="RoPE key dims kept per layer (default: all key dims at "
                                                      "--kv-ratio 1, else a third of the budget, at most min(64, 3/4 head_dim))."),
    method: Optional[str] = typer.Option(None, help=f"mla (ours) | rorope-pca | weight-svd (baselines). {_d('method')}"),
    rank_allocation: Optional[str] = typer.Option(None, help="adaptive (eigen-tail) | uniform | sensitivity (eigen-tail "
                                                          "weighted by each layer's measured effect on the output). "
                                                          f"{_d('rank_allocation')}"),
    sensitivity_samples: Optional[int] = typer.Option(None, help="Calibration windows the layer sensitivities are "
                                                                 f"measured on. {_d('sensitivity_samples')}"),
    sensitivity_power: Optional[float] = typer.Option(None, help="Sensitivity allocation: weigh layers by s_l ** "
                                                                 "this (0 = adaptive, 1 = the full measured ratio). "
                                                                 f"{_d('sensitivity_power')}"),
    min_rank_fraction: Optional[float] = typer.Option(None, help="Adaptive: lowest rank as a fraction of the uniform "
                                                                 f"rank. {_d('min_rank_fraction')}"),
    calib: Optional[str] = typer.Option(None, help="Calibration data: 'teacher-samples' (text sampled from the "
                                                   "source itself; holds the whole model in memory while it samples), "
                                                   "'builtin' (stdlib docstrings), a Hub dataset id or a "
                                                   ".jsonl/.parquet/.txt file; several joined by '+' take equal "
                                                   f"shares of the windows. {_d('calib')}"),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration windows [default: 32 when teacher-samples is "
                                                           "part of --calib, else 64]"),
    calib_seq_len: Optional[int] = typer.Option(None, help=f"Tokens per calibration window. {_d('calib_seq_len')}"),
    calib_seed: Optional[int] = typer.Option(None, help="The calibration documents are shuffled with this seed before "
                                                        "windows are cut (another seed: another draw of the same "
                                                        f"corpus; 0: corpus order). {_d('calib_seed')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"Calibration batch size. {_d('batch_size')}"),
    propagate: Optional[str] = typer.Option(None, help="Inputs of later layers: 'original' or 'converted' layers. "
                                                       f"{_d('propagate')}"),
    value_fit: Optional[str] = typer.Option(None, help="Value up-projection: fit on attention outputs or on tokens. "
                                                       f"{_d('value_fit')}"),
    att_samples: Optional[int] = typer.Option(None, help="Calibration windows used for the attention-averaged value "
                                                         f"statistics. {_d('att_samples')}"),
    refit_output: Optional[bool] = typer.Option(None, "--refit-output/--no-refit-output",
                                                help="Refit each layer's o_proj in closed form so that, on the "
                                                     "calibration text, the converted residual stream after its "
                                                     "attention lands on the source's. "
                                                     f"{_d('refit_output')}"),
    refit_ridge: Optional[float] = typer.Option(None, help="That refit's ridge toward the source's o_proj, relative "
                                                           f"to its mean input energy. {_d('refit_ridge')}"),
    rope_layout: Optional[str] = typer.Option(None, help="free (data-driven RoPE pairs) | deepseek (exportable "
                                                         f"table). {_d('rope_layout')}"),
    nope_fit: Optional[str] = typer.Option(None, help="Dropped RoPE pairs: averaged (stand in the attention-averaged "
                                                      "rotation, fitted on calibration sequences) | unrotated (drop "
                                                      f"the rotation). {_d('nope_fit')}"),
    rope_mixing: Optional[str] = typer.Option(None, help="How each frequency's KV heads are mixed before RoPE pairs "
                                                         "are kept: complex (a unitary mix, each head's pair turned "
                                                         "by its own angle) | real (an orthogonal mix). "
                                                         f"{_d('rope_mixing')}"),
    centre: Optional[bool] = typer.Option(None, "--centre/--no-centre",
                                          help="Centre the latent on the calibration mean. --no-centre: bias-free "
                                               "latent, so the engine export (export --engine) is exact for bias-free "
                                               f"families. {_d('centre')}"),
    engine: Optional[bool] = typer.Option(None, "--engine", help="Convert to the form vLLM/SGLang/llama.cpp serve "
                                                              "(export --engine, exact): --rope-layout deepseek, "
                                                              "--rank-allocation uniform, --no-centre."),
    dtype: Optional[str] = typer.Option(None, help=f"Output dtype: auto (source's), float32, bfloat16, float16. {_d('dtype')}"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace OUT if it exists (without --resume: "
                                                                       "also discard a partial run of it)."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue a killed conversion of OUT from its last "
                                                                 "finished layer."),
    eval_samples: Optional[int] = typer.Option(None, help="Sequences each layer's reconstruction error is measured on. "
                                                          f"{_d('eval_samples')}"),
    eval_seq_len: Optional[int] = typer.Option(None, help=f"Their length. {_d('eval_seq_len')}"),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with any of these options (flags win)."),
    json_out: bool = typer.Option(False, "--json", help="Print the conversion summary as JSON."),
) -> None:
    """Convert a GQA model to MLA in one shot.

    Examples:

      mla-retrofit convert smollm2-135m-instruct out/ --kv-ratio 0.5

      mla-retrofit convert Qwen/Qwen2.5-7B out/ --kv-dim 256 --calib data.jsonl

      mla-retrofit convert model/ out/ --kv-ratio 1.0      # lossless (exact) construction

      mla-retrofit convert model/ out/ --engine            # the form engines serve; then export out/ X --engine

      mla-retrofit convert model/ out/ --resume            # continue a killed run of the same command
    """
    from mla_retrofit.convert.pipeline import Converter

    with user_errors():
        names = set(ConvertConfig.model_fields)
        given = typed_flags(ctx, names - {"model", "output"})
        cfg = ConvertConfig(model=model, output=str(out), **{**config_file_values(config, names), **given})
        t0 = time.time()
        with err_console.status(f"loading {model}"):
            conv = Converter(cfg)
        info(f"converting [bold]{model}[/] -> {out}")
        with progress_bar() as bar:
            tasks = {}

            def progress(stage: str, i: int, n: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=n, extra="")
                bar.update(tasks[stage], completed=i)

            conv.progress = progress
            result = conv.run()
        state.record("convert", str(out), source=model)
        summary = {"output": str(out), "kv_ratio": result.kv_ratio, "kv_values_per_token": result.kv_converted,
                   "kv_values_per_token_original": result.kv_original, "seconds": round(time.time() - t0, 1),
                   "peak_rss_mb": round(result.peak_rss_mb)}
        if json_out:
            typer.echo(json.dumps(summary))
            return
        print_conversion(result)
        for note in conv.notes:
            info(f"note: {note}")
        info(f"wrote {out} in {summary['seconds']} s (peak RSS {summary['peak_rss_mb']} MB); next: mla-retrofit heal")


def print_conversion(result) -> None:
    if VERBOSITY["level"] >= 1:
        table = Table(title="conversion report", show_lines=False)
        sens = all(r.sensitivity is not None for r in result.layers)
        cols = ("layer", "rank", "rope", "retained", "K err", "V err", "attn err", "pred err")
        for col in cols + (("sensitivity", "KL pred", "KL meas") if sens else ()):
            table.add_column(col, justify="right")
        for r in result.layers:
            row = [str(r.layer), str(r.rank), str(r.rope_dim), f"{r.retained_energy:.3f}", f"{r.key_error:.4f}",
                   f"{r.value_error:.4f}", f"{r.attn_error:.4f}",
                   "-" if r.predicted_error is None else f"{r.predicted_error:.4f}"]
            if sens:
                row += [f"{r.sensitivity:.3g}", f"{r.predicted_kl:.4f}", f"{r.measured_kl:.4f}"]
            table.add_row(*row)
        console.print(table)
    console.print(f"KV cache per token: {result.kv_converted} values (original {result.kv_original}) -> "
                  f"[bold]{result.kv_ratio:.3f}x[/]", highlight=False)

"""``mla-retrofit inspect``: what a conversion would do, from the config alone."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from .common import console, user_errors
from .tables import engines_table


def inspect(
    model: str = typer.Argument(..., help="Hub id, local directory, .gguf file or 'smollm2-135m-instruct'."),
    kv_ratio: Optional[float] = typer.Option(None, help="Planned cache fraction (0.5 unless --kv-dim or --rank)."),
    kv_dim: Optional[int] = typer.Option(None, help="Planned cache values per token per layer."),
    rank: Optional[int] = typer.Option(None, help="Planned uniform rank."),
    rope_dim: Optional[int] = typer.Option(None, help="Planned RoPE dims."),
    dtype: str = typer.Option("bf16", help="Dtype for byte figures."),
    calib_samples: int = typer.Option(32, help="Planned calibration windows (for the memory estimate)."),
    calib_seq_len: int = typer.Option(512, help="Planned calibration window length."),
    calib: str = typer.Option("teacher-samples+builtin", help="Planned calibration data (teacher-samples holds the "
                                                              "whole model while it samples)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Read only the config: architecture, support, KV cache now and after conversion, memory needed.

    Examples:

      mla-retrofit inspect Qwen/Qwen2.5-7B --kv-ratio 0.5

      mla-retrofit inspect smollm2-135m-instruct --rank 128 --rope-dim 64 --json
    """
    from mla_retrofit.inspection import plan

    with user_errors():
        p = plan(model, kv_ratio=kv_ratio, kv_dim=kv_dim, rank=rank, rope_dim=rope_dim, dtype=dtype,
                 calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib=calib)
        if json_out:
            typer.echo(json.dumps(p, indent=2))
            return
        t = Table(title=f"{model}", show_header=False)
        t.add_column("key")
        t.add_column("value")
        for k, v in p.items():
            if k != "engines":
                t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        console.print(t)
        console.print(engines_table(p["engines"]))

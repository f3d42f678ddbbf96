"""The ``mla-retrofit`` command line: parse, build a config, call one library function, print the result."""

from __future__ import annotations

import errno
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mla_retrofit import __version__
from mla_retrofit.convert.config import ConvertConfig
from mla_retrofit.errors import UserError

from . import state

app = typer.Typer(
    help="Retrofit GQA checkpoints with Multi-head Latent Attention: convert, heal, bench.\n\n"
    "  mla-retrofit convert smollm2-135m-instruct out/\n\n  mla-retrofit heal\n\n  mla-retrofit bench --kv-report",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
VERBOSITY = {"level": 1}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mla-retrofit {__version__}")
        raise typer.Exit()


def _d(name: str) -> str:
    return default_of(ConvertConfig, name)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print more detail (per-layer tables; the traceback of an internal error)."),
) -> None:
    VERBOSITY["level"] = 0 if quiet else (2 if verbose else 1)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def user_errors():
    try:
        yield
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"no space left on the device ({e.filename or 'while writing'}); free some space and rerun the same "
                 "command (convert: add --resume to continue from the last finished layer)")
        internal_error(e)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:
        internal_error(e)


def internal_error(e: BaseException) -> None:
    """A failure that is not the user's input: one line by default, the traceback with ``-v``."""
    if VERBOSITY["level"] >= 2:
        raise e
    fail(f"internal error ({type(e).__name__}: {e}); this is a bug in mla-retrofit: rerun with -v for the traceback "
         "and report it")


def info(msg: str) -> None:
    if VERBOSITY["level"] >= 1:
        console.print(msg, highlight=False, soft_wrap=True)


def progress_bar():
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[extra]}"), console=err_console,
                    disable=VERBOSITY["level"] == 0, transient=False)


def read_config_file(config: Path) -> dict:
    """The mapping in a YAML or JSON ``--config`` file; a one-line error when missing or unparsable."""
    if not config.is_file():
        raise UserError(f"config file {config} does not exist")
    text = config.read_text()
    try:
        if config.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
    except Exception as e:
        raise UserError(f"cannot parse config file {config} ({e})") from e
    if not isinstance(loaded, dict):
        raise UserError(f"config file {config} must hold a mapping of option names to values")
    return loaded


def config_file_values(path: Optional[Path], names: set[str], not_from_file: tuple[str, ...] = ("model", "output")) -> dict:
    """Every key of a ``--config`` file (YAML/JSON, keys = option names), checked against the config's fields."""
    out = {}
    for key, value in (read_config_file(path) if path is not None else {}).items():
        k = key.replace("-", "_")
        if k not in names or k in not_from_file:
            raise UserError(f"unknown key '{key}' in {path}; valid keys: {', '.join(sorted(names - set(not_from_file)))}")
        out[k] = value
    return out


def typed_flags(ctx: typer.Context, values: dict) -> dict:
    """The options the user typed on the command line; the others take the config's own defaults."""
    out = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            out[name] = value
    return out


def default_of(cls, name: str) -> str:
    """``(default: X)`` for a help text, read from the config class (so the CLI restates no default)."""
    return f"(default: {cls.model_fields[name].default})"


# ---------------------------------------------------------------------------------------------------------
@app.command()
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
        local = dict(locals())
        given = typed_flags(ctx, {k: local[k] for k in names - {"model", "output"} if k in local})
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


# ---------------------------------------------------------------------------------------------------------
def pick(kind: str, given: Optional[str], what: str) -> str:
    if given:
        return given
    found = state.last(kind)
    if found is None:
        raise UserError(f"no {what} given and no previous run here; run 'mla-retrofit convert MODEL OUT' first")
    info(f"using the last {kind} output: {found}")
    return found


def _plain(obj):
    try:
        return asdict(obj)
    except TypeError:
        return obj if isinstance(obj, (dict, list)) else getattr(obj, "__dict__", str(obj))


# ---------------------------------------------------------------------------------------------------------
@app.command()
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


from .tables import engines_table  # noqa: E402
from . import bench_cmd, export_cmd, heal_cmd  # noqa: E402,F401  (register 'bench', 'export', 'heal' on the app)

if __name__ == "__main__":
    app()

"""The ``mla-retrofit`` command line: parse, build a config, call one library function, print the result."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mla_retrofit import __version__
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


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print more detail (per-layer tables)."),
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
        raise typer.Exit(130)


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


def merge_config_file(ctx: typer.Context, config: Optional[Path], values: dict) -> dict:
    """Values from ``--config`` (YAML or JSON, keys = option names) under flags given on the command line."""
    if config is None:
        return values
    loaded = read_config_file(config)
    out = dict(values)
    for key, val in loaded.items():
        k = key.replace("-", "_")
        if k not in values:
            raise UserError(f"unknown key '{key}' in {config}; valid keys: {', '.join(sorted(values))}")
        source = ctx.get_parameter_source(k)
        if source is None or source.name != "COMMANDLINE":
            out[k] = val
    return out


# ---------------------------------------------------------------------------------------------------------
@app.command()
def convert(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hub id, local HF directory, .gguf file, or 'smollm2-135m-instruct'."),
    out: Path = typer.Argument(..., help="Output directory (written atomically)."),
    kv_ratio: Optional[float] = typer.Option(0.5, help="Cache size as a fraction of the original (0, 1]."),
    kv_dim: Optional[int] = typer.Option(None, help="Cache values per token per layer (overrides --kv-ratio)."),
    rank: Optional[int] = typer.Option(None, help="Explicit uniform latent rank (with --rope-dim)."),
    rope_dim: Optional[int] = typer.Option(None, help="RoPE key dims kept per layer (default min(64, head_dim))."),
    method: str = typer.Option("mla", help="mla (ours) | rorope-pca | weight-svd (baselines)."),
    rank_allocation: str = typer.Option("adaptive", help="adaptive | uniform."),
    min_rank_fraction: float = typer.Option(0.25, help="Adaptive: lowest rank as a fraction of the uniform rank."),
    calib: str = typer.Option("builtin", help="Calibration data: 'builtin', a Hub dataset id, .jsonl/.parquet/.txt."),
    calib_samples: int = typer.Option(64, help="Calibration windows."),
    calib_seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    batch_size: int = typer.Option(8, help="Calibration batch size."),
    propagate: str = typer.Option("original", help="Inputs of later layers: 'original' or 'converted' layers."),
    value_fit: str = typer.Option("attention", help="Value up-projection: fit on attention outputs or on tokens."),
    att_samples: int = typer.Option(16, help="Calibration windows used for the attention-averaged value statistics."),
    rope_layout: str = typer.Option("free", help="free (data-driven RoPE pairs) | deepseek (exportable table)."),
    centre: bool = typer.Option(True, "--centre/--no-centre",
                                help="Centre the latent on the calibration mean. --no-centre: bias-free latent, "
                                     "so the engine export (export --engine) is exact for bias-free families."),
    dtype: str = typer.Option("auto", help="Output dtype: auto (source's), float32, bfloat16, float16."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with these options (flags win)."),
    json_out: bool = typer.Option(False, "--json", help="Print the conversion summary as JSON."),
) -> None:
    """Convert a GQA model to MLA in one shot.

    Examples:

      mla-retrofit convert smollm2-135m-instruct out/ --kv-ratio 0.5

      mla-retrofit convert Qwen/Qwen2.5-7B out/ --kv-dim 256 --calib data.jsonl

      mla-retrofit convert model/ out/ --kv-ratio 1.0      # lossless (exact) construction
    """
    from mla_retrofit.convert.pipeline import ConvertConfig, Converter

    with user_errors():
        local = dict(locals())
        values = {f.name: local[f.name] for f in fields(ConvertConfig) if f.name in local and f.name != "model"}
        values = merge_config_file(ctx, config, values)
        cfg = ConvertConfig(model=model, output=str(out), **values)
        cfg.validate()
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
        info(f"wrote {out} in {summary['seconds']} s (peak RSS {summary['peak_rss_mb']} MB); next: mla-retrofit heal")


def print_conversion(result) -> None:
    if VERBOSITY["level"] >= 1:
        table = Table(title="conversion report", show_lines=False)
        for col in ("layer", "rank", "rope", "retained", "K err", "V err", "attn err"):
            table.add_column(col, justify="right")
        for r in result.layers:
            table.add_row(str(r.layer), str(r.rank), str(r.rope_dim), f"{r.retained_energy:.3f}", f"{r.key_error:.4f}",
                          f"{r.value_error:.4f}", f"{r.attn_error:.4f}")
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
def bench(
    model: Optional[str] = typer.Argument(None, help="Model to benchmark (default: the last heal, else the last convert)."),
    baseline: Optional[str] = typer.Option(None, help="Baseline (default: the conversion's source model)."),
    kv_report: bool = typer.Option(False, "--kv-report", help="KV-cache report (analytic and measured)."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Perplexity, KL and top-1 agreement vs the baseline."),
    speed: bool = typer.Option(False, "--speed", help="Prefill/decode speed vs the baseline."),
    context: str = typer.Option("4k,32k,128k", help="Context lengths for the KV table."),
    batch: str = typer.Option("1,8", help="Batch sizes for the KV table."),
    dtype: str = typer.Option("bf16", help="Cache dtype for the KV table: bf16, fp16, fp32, fp8."),
    memory: str = typer.Option("80GB", help="Memory for the 'what fits' rows (weights included)."),
    text: str = typer.Option("builtin-eval", help="Fidelity text: builtin-eval, a .txt/.jsonl file or dataset id."),
    eval_samples: int = typer.Option(16, help="Fidelity windows."),
    eval_seq_len: int = typer.Option(512, help="Tokens per fidelity window."),
    speed_context: str = typer.Option("4k,8k", help="Context lengths for the speed runs."),
    speed_batch: int = typer.Option(1, help="Batch size for the speed runs."),
    speed_cache: str = typer.Option("dynamic", help="Speed runs with: dynamic (each model's generate() default cache), static (both preallocated), compiled (static + torch.compile; CUDA graphs on GPU); comma list."),
    decode_steps: int = typer.Option(8, help="Timed decode steps per round."),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
    weights_dtype: str = typer.Option("auto", help="Weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."),
    attn: str = typer.Option("auto", help="Attention kernels: auto (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa, eager, flash_attention_2."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: cache vs context, decode tokens/s vs context."),
    lm_eval: Optional[str] = typer.Option(None, help="Comma list of lm-evaluation-harness tasks (needs lm_eval)."),
) -> None:
    """Benchmark a converted model against its original: KV report, fidelity, speed.

    With none of --kv-report/--fidelity/--speed, all three run.

    Examples:

      mla-retrofit bench --kv-report

      mla-retrofit bench out/ --fidelity --text heldout.txt --json bench.json

      mla-retrofit bench out/ --speed --speed-context 4k,8k --plot bench.png
    """
    from mla_retrofit.bench.run import BenchConfig, plot as make_plot, run_bench

    with user_errors():
        if model is None:
            model = state.last("heal") or state.last("convert")
            if model is None:
                raise UserError("no model given and no previous run here; run 'mla-retrofit convert MODEL OUT' first")
            info(f"using the last run's output: {model}")
        if lm_eval:
            _check_lm_eval()
        none = not (kv_report or fidelity or speed)
        cfg = BenchConfig(model=model, baseline=baseline, kv_report=kv_report or none, fidelity=fidelity or none,
                          speed=speed or none, contexts=context, batches=batch, dtype=dtype, memory=memory, text=text,
                          eval_samples=eval_samples, eval_seq_len=eval_seq_len, speed_contexts=speed_context,
                          speed_batch=speed_batch, speed_cache=speed_cache, decode_steps=decode_steps,
                          device=device, weights_dtype=weights_dtype, attn=attn)
        with err_console.status("benchmarking") as status:
            result = run_bench(cfg, progress=lambda s: status.update(s), command=" ".join(["mla-retrofit"] + sys.argv[1:]))
        if lm_eval:
            result["lm_eval"] = _run_lm_eval(model, lm_eval)
        print_bench(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=2))
            info(f"wrote {json_path}")
        if plot:
            make_plot(result, str(plot))
            info(f"wrote {plot}")


def _check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from e


def _run_lm_eval(model: str, tasks: str) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},trust_remote_code=True",
                                  tasks=tasks.split(","))
    return out.get("results", {})


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB"


def print_bench(result: dict) -> None:
    rt = result.get("runtime")
    if rt:
        console.print(f"ran on {rt['device']}, {rt['weights_dtype']} weights, {rt['attn_implementation']} attention",
                      highlight=False)
    rep = result.get("kv_report")
    if rep:
        if VERBOSITY["level"] >= 2:
            t = Table(title="cache values per token, per layer")
            for col in ("layer", "rank", "rope", "values", "baseline"):
                t.add_column(col, justify="right")
            for r in rep["per_layer"]:
                t.add_row(str(r["layer"]), str(r.get("rank", "-")), str(r.get("rope_dim", "-")), str(r["values"]),
                          str(r["baseline_values"] or "-"))
            console.print(t)
        per = rep["bytes_per_token"]
        console.print(f"KV cache per token ({rep['dtype']}): model {per['model']} B, baseline {per['baseline'] or '-'} B"
                      + (f"  -> {per['model'] / per['baseline']:.3f}x" if per["baseline"] else ""), highlight=False)
        t = Table(title=f"KV cache size ({rep['dtype']})")
        for col in ("context", "batch", "model", "baseline", "saved"):
            t.add_column(col, justify="right")
        for r in rep["table"]:
            saved = "-" if not r["baseline_bytes"] else f"{1 - r['model_bytes'] / r['baseline_bytes']:.1%}"
            t.add_row(str(r["context"]), str(r["batch"]), _gib(r["model_bytes"]), _gib(r["baseline_bytes"]), saved)
        console.print(t)
        fit = rep["fit"]
        t = Table(title=f"what fits in {fit['memory_bytes'] / 1e9:.0f} GB (weights included)")
        for col in ("context", "max batch (model)", "max batch (baseline)"):
            t.add_column(col, justify="right")
        for r in fit["max_batch"]:
            t.add_row(str(r["context"]), str(r["model"]), str(r["baseline"] if r["baseline"] is not None else "-"))
        console.print(t)
        m = rep["measured"]
        for name, g in m.items():
            ok = "[green]equal[/]" if g["measured_bytes"] == g["analytic_bytes"] else "[red]DIFFERENT[/]"
            console.print(f"measured after generate() ({name}): {g['measured_bytes']} B held for {g['cached_tokens']} "
                          f"tokens; analytic {g['analytic_bytes']} B: {ok}")
    fid = result.get("fidelity")
    if fid:
        console.print(f"fidelity on {fid['text']} ({fid['tokens']} tokens): ppl {fid['ppl_model']:.3f} vs "
                      f"{fid['ppl_baseline']:.3f} ([bold]{fid['ppl_ratio']:.3f}x[/]), KL {fid['kl']:.4f} nats/token, "
                      f"top-1 agreement {fid['top1_agreement']:.1%}", highlight=False)
    sp = result.get("speed")
    if sp:
        t = Table(title=f"speed, batch {sp[0]['batch']} (tokens/s: model / baseline)")
        for col in ("context", "cache", "prefill", "ratio", "decode", "ratio"):
            t.add_column(col, justify="right")
        for r in sp:
            m, b = r["model"], r["baseline"]
            t.add_row(str(r["context"]), "compiled" if r.get("compiled") else r.get("cache", "dynamic"),
                      f"{m['prefill_tok_s']:.0f} / {b['prefill_tok_s']:.0f}", f"{r['prefill_ratio']:.2f}x",
                      f"{m['decode_tok_s']:.1f} / {b['decode_tok_s']:.1f}", f"[bold]{r['decode_ratio']:.2f}x[/]")
        console.print(t)
        if any(r.get("cache", "dynamic") == "dynamic" for r in sp):
            console.print("dynamic: each model's default generate() cache (the GQA cache is re-concatenated every "
                          "step, the MLA latent is written in place); --speed-cache static compares both on "
                          "preallocated caches", style="dim", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: str = typer.Argument(..., help="Hub id, local directory, .gguf file or 'smollm2-135m-instruct'."),
    kv_ratio: Optional[float] = typer.Option(0.5, help="Planned cache fraction."),
    kv_dim: Optional[int] = typer.Option(None, help="Planned cache values per token per layer."),
    rank: Optional[int] = typer.Option(None, help="Planned uniform rank."),
    rope_dim: Optional[int] = typer.Option(None, help="Planned RoPE dims."),
    dtype: str = typer.Option("bf16", help="Dtype for byte figures."),
    calib_samples: int = typer.Option(64, help="Planned calibration windows (for the memory estimate)."),
    calib_seq_len: int = typer.Option(512, help="Planned calibration window length."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Read only the config: architecture, support, KV cache now and after conversion, memory needed.

    Examples:

      mla-retrofit inspect Qwen/Qwen2.5-7B --kv-ratio 0.5

      mla-retrofit inspect smollm2-135m-instruct --rank 128 --rope-dim 64 --json
    """
    from mla_retrofit.inspect import plan

    with user_errors():
        p = plan(model, kv_ratio=kv_ratio, kv_dim=kv_dim, rank=rank, rope_dim=rope_dim, dtype=dtype,
                 calib_samples=calib_samples, calib_seq_len=calib_seq_len)
        if json_out:
            typer.echo(json.dumps(p, indent=2))
            return
        t = Table(title=f"{model}", show_header=False)
        t.add_column("key")
        t.add_column("value")
        for k, v in p.items():
            t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        console.print(t)


from . import export_cmd, heal_cmd  # noqa: E402,F401  (register 'export' and 'heal' on the app)

if __name__ == "__main__":
    app()

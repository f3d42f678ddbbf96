"""``mla-retrofit bench``: KV report, fidelity against the original, speed, and how they are printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mla_retrofit.bench.config import BenchConfig
from mla_retrofit.errors import UserError

from . import state
from .tables import engines_table
from .common import VERBOSITY, config_file_values, console, default_of, err_console, info, typed_flags, user_errors


def _d(name: str) -> str:
    return default_of(BenchConfig, name)


def bench(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model to benchmark (default: the last heal, else the last convert)."),
    baseline: Optional[str] = typer.Option(None, help="Baseline (default: the conversion's source model)."),
    kv_report: Optional[bool] = typer.Option(None, "--kv-report", help="KV-cache report (analytic and measured)."),
    fidelity: Optional[bool] = typer.Option(None, "--fidelity", help="Perplexity, KL and top-1 agreement vs the baseline."),
    speed: Optional[bool] = typer.Option(None, "--speed", help="Prefill/decode speed vs the baseline."),
    contexts: Optional[str] = typer.Option(None, "--context", help=f"Context lengths for the KV table. {_d('contexts')}"),
    batches: Optional[str] = typer.Option(None, "--batch", help=f"Batch sizes for the KV table. {_d('batches')}"),
    dtype: Optional[str] = typer.Option(None, help=f"Cache dtype for the KV table: bf16, fp16, fp32, fp8. {_d('dtype')}"),
    memory: Optional[str] = typer.Option(None, help=f"Memory for the 'what fits' rows (weights included). {_d('memory')}"),
    text: Optional[str] = typer.Option(None, help="Fidelity text: builtin-eval, a .txt/.jsonl file or dataset id. "
                                                  f"{_d('text')}"),
    eval_samples: Optional[int] = typer.Option(None, help=f"Fidelity windows. {_d('eval_samples')}"),
    eval_seq_len: Optional[int] = typer.Option(None, help=f"Tokens per fidelity window. {_d('eval_seq_len')}"),
    speed_contexts: Optional[str] = typer.Option(None, "--speed-context", help="Context lengths for the speed runs. "
                                                                               f"{_d('speed_contexts')}"),
    speed_batch: Optional[int] = typer.Option(None, help=f"Batch size for the speed runs. {_d('speed_batch')}"),
    speed_cache: Optional[str] = typer.Option(None, help="Speed runs with: dynamic (each model's generate() default "
                                              "cache), static (both preallocated), compiled (static + torch.compile; "
                                              f"CUDA graphs on GPU); comma list. {_d('speed_cache')}"),
    decode_steps: Optional[int] = typer.Option(None, help=f"Timed decode steps per round. {_d('decode_steps')}"),
    decode_rounds: Optional[int] = typer.Option(None, help=f"Timed rounds (the best is kept). {_d('decode_rounds')}"),
    generate_tokens: Optional[int] = typer.Option(None, help="Tokens generated when the cache bytes are measured. "
                                                             f"{_d('generate_tokens')}"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's)."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
    weights_dtype: Optional[str] = typer.Option(None, help="Weights and activations: auto (bfloat16 on CUDA, float32 "
                                                           "on CPU), float32, bfloat16, float16."),
    attn: Optional[str] = typer.Option(None, help="Attention kernels: auto (flash_attention_2 on CUDA when flash-attn "
                                                  "is installed, else sdpa), sdpa, eager, flash_attention_2."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with any of these options (flags win)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: cache vs context, decode tokens/s vs context."),
    tasks: Optional[str] = typer.Option(None, help="Executed task benchmarks, model and baseline on the same problems: "
                                                   "humaneval (greedy pass@1, each program sandboxed)."),
    task_limit: Optional[int] = typer.Option(None, help="Only the first N problems of each task (default: all)."),
    task_max_tokens: Optional[int] = typer.Option(None, help=f"Greedy tokens per completion. {_d('task_max_tokens')}"),
    task_batch: Optional[int] = typer.Option(None, help=f"Prompts generated together. {_d('task_batch')}"),
    task_timeout: Optional[float] = typer.Option(None, help=f"Seconds per program. {_d('task_timeout')}"),
) -> None:
    """Benchmark a converted model against its original: KV report, fidelity, speed.

    With none of --kv-report/--fidelity/--speed, all three run (only the tasks when --tasks alone is given).

    Examples:

      mla-retrofit bench --kv-report

      mla-retrofit bench out/ --fidelity --text heldout.txt --json bench.json

      mla-retrofit bench out/ --speed --speed-context 4k,8k --plot bench.png

      mla-retrofit bench out/ --tasks humaneval --json he.json
    """
    from mla_retrofit.bench.run import plot as make_plot, run_bench

    with user_errors():
        if model is None:
            model = state.last("heal") or state.last("convert")
            if model is None:
                raise UserError("no model given and no previous run here; run 'mla-retrofit convert MODEL OUT' first")
            info(f"using the last run's output: {model}")
        names = set(BenchConfig.model_fields)
        values = {**config_file_values(config, names, ("model",)),
                  **typed_flags(ctx, names - {"model"})}
        sections = ("kv_report", "fidelity", "speed")
        if any(values.get(k) for k in sections) or values.get("tasks"):  # asking for some runs only those
            values.update({k: bool(values.get(k)) for k in sections})
        cfg = BenchConfig(model=model, **values)
        with err_console.status("benchmarking") as status:
            result = run_bench(cfg, progress=lambda s: status.update(s), command=" ".join(["mla-retrofit"] + sys.argv[1:]))
        print_bench(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=2))
            info(f"wrote {json_path}")
        if plot:
            make_plot(result, str(plot))
            info(f"wrote {plot}")


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
        if rep.get("engines"):
            console.print(engines_table(rep["engines"]))
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
        if fid.get("kl_by_position"):
            quarters = ", ".join(f"{v:.3f}" for v in fid["kl_by_position"])
            console.print(f"KL by quarter of the window, first to last: {quarters}", highlight=False)
    for name, t in (result.get("tasks") or {}).items():
        print_task(name, t)
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


def print_task(name: str, t: dict) -> None:
    m, b, p = t["model"], t.get("baseline"), t.get("paired")
    line = f"{name}: pass@1 model {m['pass_at_1']:.1%} ({m['passed']}/{m['problems']})"
    if b:
        line += f", baseline {b['pass_at_1']:.1%} ({b['passed']}/{b['problems']})"
    console.print(line + f"; generation {m['generate_seconds']:.0f} s", highlight=False)
    if p:
        tab = Table(title=f"{name}: the same {p['problems']} problems (rows: model, columns: baseline)")
        for col in ("", "baseline passed", "baseline failed"):
            tab.add_column(col, justify="right")
        tab.add_row("model passed", str(p["both"]), str(p["model_only"]))
        tab.add_row("model failed", str(p["baseline_only"]), str(p["neither"]))
        console.print(tab)
        lo, hi = p["ci95"]
        console.print(f"difference {100 * p['difference']:+.1f} points (paired bootstrap 95% CI {100 * lo:+.1f} to "
                      f"{100 * hi:+.1f}), exact McNemar p = {p['mcnemar_p']:.3g}", highlight=False)
    statuses: dict = {}
    for r in m["results"]:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    console.print("model outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())), style="dim")

"""``mla-retrofit heal``: flags and ``--config`` -> :class:`HealConfig` -> :func:`mla_retrofit.heal.heal` -> print.

Only the flags given on the command line are passed on; every default lives in
``HealConfig`` (and its presets), and every ``HealConfig`` field can be set in
the ``--config`` file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer



from . import state
from mla_retrofit.heal.config import BASE, PRESETS, HealConfig

from .common import _plain, config_file_values, console, default_of, info, pick, progress_bar, typed_flags, user_errors

def _d(name: str) -> str:
    return default_of(HealConfig, name)


def heal(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Converted checkpoint, or a DeepSeek-V3 export of one "
                                                     "(default: the last 'convert' here)."),
    out: Optional[Path] = typer.Argument(None, help="Output directory (default: MODEL-healed)."),
    teacher: Optional[str] = typer.Option(None, help="Original model (default: from conversion.json)."),
    data: Optional[str] = typer.Option(None, help="teacher-samples (text sampled from the teacher; the cpu-demo "
                                       "default), a Hub dataset id (default: HuggingFaceTB/smoltalk), a local "
                                       ".jsonl/.parquet/.txt, builtin or builtin-chat."),
    preset: Optional[str] = typer.Option(None, help="cpu-demo | gpu-7b: budget, data and batch defaults."),
    tokens: Optional[int] = typer.Option(None, help="Total training tokens over all phases."),
    steps: Optional[int] = typer.Option(None, help="Total optimizer steps over all phases (instead of --tokens)."),
    split: Optional[str] = typer.Option(None, help="Budget split over the 3 phases [preset, else 0.25,0.5,0.25]; 0 skips one."),
    seq_len: Optional[int] = typer.Option(None, help="Packed window length."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of phase 2 (phases 1 and 3: times "
                                       "their scales)."),
    imitate_lr_scale: Optional[float] = typer.Option(None, help="Phase 1 peak learning rate = lr x this (default: "
                                                     f"{BASE['imitate_lr_scale']}; cpu-demo: "
                                                     f"{PRESETS['cpu-demo'].get('imitate_lr_scale', 1.0)})."),
    full_lr_scale: Optional[float] = typer.Option(None, help="Phase 3 peak learning rate = lr x this (default: 0.2)."),
    warmup_fraction: Optional[float] = typer.Option(None, help="Linear warm-up share of each phase, then cosine "
                                                    "decay to 0 (default: 0.05; cpu-demo 0.1, gpu-7b 0.03)."),
    weight_decay: Optional[float] = typer.Option(None, help=f"AdamW weight decay. {_d('weight_decay')}"),
    max_grad_norm: Optional[float] = typer.Option(None, help=f"Gradient clipping norm (0: none). {_d('max_grad_norm')}"),
    distill: Optional[float] = typer.Option(None, help=f"Phases 2-3: weight of KL(teacher || student). {_d('distill')}"),
    ce_weight: Optional[float] = typer.Option(None, help=f"Phase 2: weight of next-token loss. {_d('ce_weight')}"),
    hidden_weight: Optional[float] = typer.Option(None, help="Phases 2-3: weight of matching every layer's "
                                                  f"residual stream to the teacher's (relative error). {_d('hidden_weight')}"),
    full_ce_weight: Optional[float] = typer.Option(None, help="Phase 3: weight of next-token loss (default: "
                                                   f"{BASE['full_ce_weight']}; gpu-7b preset: "
                                                   f"{PRESETS['gpu-7b']['full_ce_weight']})."),
    refit: Optional[bool] = typer.Option(None, "--refit/--no-refit", help="Closed-form o_proj refit toward the "
                                         "teacher before phase 1 (gated like a phase)."),
    loss_chunk: Optional[int] = typer.Option(None, help="Tokens per slice of the chunked KL (default: 1024; gpu-7b 256)."),
    dev_fraction: Optional[float] = typer.Option(None, help="Share of the training documents held out as the "
                                                 f"gate's dev split. {_d('dev_fraction')}"),
    dev_windows: Optional[int] = typer.Option(None, help=f"Dev windows the gate scores. {_d('dev_windows')}"),
    eval_every: Optional[int] = typer.Option(None, help="Also score the dev split every N steps [only phase ends]."),
    keep_last: Optional[bool] = typer.Option(None, "--keep-last", help="Keep a phase even if it worsens the dev KL."),
    refit_windows: Optional[int] = typer.Option(None, help=f"Windows the --refit solves on. {_d('refit_windows')}"),
    refit_ridge: Optional[float] = typer.Option(None, help="--refit: ridge toward the current weights, relative to "
                                                f"the mean input energy. {_d('refit_ridge')}"),
    imitate_metric: Optional[str] = typer.Option(None, help="Phase 1's error measure: mse (relative, every direction "
                                                 "alike) or fisher (weighted by how much the teacher's output "
                                                 f"depends on each direction). {_d('imitate_metric')}"),
    fisher_ridge: Optional[float] = typer.Option(None, help="--imitate-metric fisher: share of plain MSE in the "
                                                 f"metric, in (0, 1]. {_d('fisher_ridge')}"),
    fisher_windows: Optional[int] = typer.Option(None, help="--imitate-metric fisher: windows the Fisher is "
                                                 f"estimated on. {_d('fisher_windows')}"),
    max_rows: Optional[int] = typer.Option(None, help=f"Hub data: rows sampled (shuffled). {_d('max_rows')}"),
    samples: Optional[int] = typer.Option(None, help="teacher-samples: how many texts to sample."),
    sample_tokens: Optional[int] = typer.Option(None, help="teacher-samples: new tokens per text (default: --seq-len)."),
    sample_top_p: Optional[float] = typer.Option(None, help="teacher-samples: nucleus mass at temperature 1 (1.0: "
                                                 f"plain sampling). {_d('sample_top_p')}"),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    keep_checkpoints: Optional[int] = typer.Option(None, help=f"Checkpoints kept. {_d('keep_checkpoints')}"),
    log_every: Optional[int] = typer.Option(None, help=f"Log to metrics.jsonl every N steps. {_d('log_every')}"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue an interrupted heal from its last checkpoint."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Trade compute for memory (default: the preset's)."),
    precision: Optional[str] = typer.Option(None, help="Matrix products of training and sampling: auto (bf16 "
                                            "on CUDA and on CPUs with AMX or AVX-512 BF16, else fp32), fp32, bf16. "
                                            f"{_d('precision')}"),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Print the plan and exit."),
    seed: Optional[int] = typer.Option(None, help=f"Random seed. {_d('seed')}"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace OUT if it exists."),
    cleanup: Optional[bool] = typer.Option(None, "--cleanup/--no-cleanup", help="Remove OUT/checkpoints once the "
                                           "healed model is written (default: cleanup)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file with any HealConfig field (flags win)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Heal a converted model toward the original: layerwise imitation, MLA-only and full distillation.

    Examples:

      mla-retrofit heal --preset cpu-demo                 # the last conversion, offline

      mla-retrofit heal out/ healed/ --data chats.jsonl --tokens 50000000

      mla-retrofit heal engine-export/ healed/ --teacher ORIGINAL --preset cpu-demo
    """
    from mla_retrofit.heal import heal as run_heal
    from mla_retrofit.heal.config import parse_split

    with user_errors():
        model_dir = pick("convert", model, "converted model")
        out_dir = out or Path(f"{model_dir.rstrip('/')}-healed")
        names = set(HealConfig.model_fields)
        given = typed_flags(ctx, names - {"model", "output"})
        values = {**config_file_values(config, names), **given}
        if "split" in values:
            values["split"] = parse_split(values["split"])
        cfg = HealConfig(model=model_dir, output=str(out_dir), **values)
        with progress_bar() as bar:
            result = run_heal(cfg, _progress(bar))
        if cfg.dry_run:
            typer.echo(json.dumps(_plain(result), default=str) if json_out else result.plan.describe())
            return
        state.record("heal", str(out_dir), source=model_dir)
        if json_out:
            typer.echo(json.dumps(_plain(result), default=str))
            return
        for e in result.evals:
            console.print(f"dev split after {e['after']:<22} KL {e['kl']:.4f} nats/token, top-1 {e['top1']:.1%}",
                          highlight=False)
        dropped = [p.name for p in result.phases if not p.kept]
        if dropped:
            info(f"phases dropped by the fidelity gate (they made the dev KL worse): {', '.join(dropped)}")
        info(f"healed model written to {out_dir}; next: mla-retrofit bench --kv-report")


def _progress(bar):
    tasks: dict[str, int] = {}

    def progress(phase: str, step: int, total: int, metrics: dict | None = None) -> None:
        metrics = metrics or {}
        if phase == "dev":  # a score of the dev split: print it above the bars
            bar.console.print(f"dev KL after {metrics['after']}: {metrics['dev_kl']:.4f} "
                              f"(top-1 {metrics['dev_top1']:.1%})", highlight=False)
            return
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, extra="")
        extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        bar.update(tasks[phase], completed=step, extra=extra)

    return progress

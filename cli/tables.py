"""Rich tables shared by several commands (built here, printed by the caller)."""

from __future__ import annotations

from rich.table import Table


def engines_table(rows: list[dict]) -> Table:
    """Where an MLA shape runs: :func:`mla_retrofit.engines.serving_table` rows."""
    t = Table(title="where this shape runs (cache values per token, all layers)")
    for col in ("engine / backends", "runs as (latent, rope)", "cache", "vs this model", "vs original", "known from"):
        t.add_column(col, justify="left" if col in ("engine / backends", "known from") else "right")
    for r in rows:
        if not r["runs"]:
            t.add_row(r["engine"], "[red]no[/]", "-", "-", "-", r["how"])
            continue
        shape = r["shape"] if isinstance(r["shape"], str) else f"{r['shape'][0]} + {r['shape'][1]}"
        vs_o = "-" if r["vs_original"] is None else f"{r['vs_original']:.2f}x"
        t.add_row(r["engine"], shape, str(r["values_per_token"]), f"{r['vs_native']:.2f}x", vs_o, r["how"])
    return t

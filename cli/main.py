"""The ``mla-retrofit`` command line: the app, its global options, and the commands it registers.

Each command lives in its own module (``*_cmd.py``) as a plain function; shared helpers are in :mod:`.common`.
Nothing here is imported by a command, so there is no import circle.
"""

from __future__ import annotations

import typer

from mla_retrofit import __version__

from . import bench_cmd, convert_cmd, export_cmd, heal_cmd, inspect_cmd
from .common import VERBOSITY

app = typer.Typer(
    help="Retrofit GQA checkpoints with Multi-head Latent Attention: convert, heal, bench.\n\n"
    "  mla-retrofit convert smollm2-135m-instruct out/\n\n  mla-retrofit heal\n\n  mla-retrofit bench --kv-report",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mla-retrofit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print more detail (per-layer tables; the traceback of an internal error)."),
) -> None:
    VERBOSITY["level"] = 0 if quiet else (2 if verbose else 1)


for _command in (convert_cmd.convert, inspect_cmd.inspect, bench_cmd.bench, export_cmd.export, heal_cmd.heal):
    app.command()(_command)

if __name__ == "__main__":
    app()

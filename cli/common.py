"""What every command shares: the consoles, verbosity, one-line errors, progress bars, reading --config files and
the flags the user typed. No command is registered here (``main`` does that), so commands import this and not
the app."""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mla_retrofit.errors import UserError

from . import state

console = Console()
err_console = Console(stderr=True)
VERBOSITY = {"level": 1}


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


def typed_flags(ctx: typer.Context, names: set[str]) -> dict:
    """The options among ``names`` that the user typed on the command line (from click's parsed ``ctx.params``);
    the others take the config's own defaults."""
    out = {}
    for name in names:
        source = ctx.get_parameter_source(name) if name in ctx.params else None
        if source is not None and source.name == "COMMANDLINE":
            out[name] = ctx.params[name]
    return out


def default_of(cls, name: str) -> str:
    """``(default: X)`` for a help text, read from the config class (so the CLI restates no default)."""
    return f"(default: {cls.model_fields[name].default})"


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

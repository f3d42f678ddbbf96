"""Regenerate docs/cli.md from the CLI's own --help (so the page never drifts from the code).

    python scripts/cli_docs.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: the terminal the page is rendered for (rich reads these when it draws the help)
TERMINAL = {"COLUMNS": "110", "NO_COLOR": "1", "TERM": "dumb"}
PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

INTRO = """# Command line reference

Generated from `--help` by `python scripts/cli_docs.py`.

Conventions: every command takes `--help`; `mla-retrofit --version`; `-q/--quiet` and
`-v/--verbose` go before the command (`mla-retrofit -q convert ...`). Commands that report numbers
take `--json`. `convert`, `heal`, `bench` and `export` take `--config FILE.yaml|json` whose keys are the
fields of the command's typed config (`ConvertConfig`, `HealConfig`, `BenchConfig`, `ExportConfig`: every
field, also those without a flag; flags given on the command line win; an unknown key or a wrong type is a
one-line error). Options left out take the config's own defaults, shown in `--help`; the fully resolved settings are
written next to every output (`conversion.json`, with a `heal` record added by `heal`; `export.json`). Exit codes: 0 success, 1 user error
(one line on stderr saying what to fix) or internal error (one line saying it is a bug; `-v` shows the
traceback), 2 usage error, 130 interrupted. A full disk is a one-line error too; a killed or failed
`convert` continues with `--resume`, a `heal` with `--resume`.

A bare `heal` uses the last `convert` output recorded in `./.mla-retrofit/state.json`; a bare
`bench` uses the last `heal` output, else the last `convert` output. Explicit paths always win.
"""


def render() -> str:
    """The page, from the CLI's --help as it is now (tests/test_shape.py checks docs/cli.md against it)."""
    from typer.testing import CliRunner

    from mla_retrofit_cli.main import app

    saved = {k: os.environ.get(k) for k in TERMINAL}
    os.environ.update(TERMINAL)
    try:
        runner = CliRunner()
        parts = [INTRO]
        for cmd in ([], ["convert"], ["heal"], ["bench"], ["inspect"], ["export"]):
            r = runner.invoke(app, [*cmd, "--help"], terminal_width=110, prog_name="mla-retrofit")
            if r.exit_code != 0:
                raise RuntimeError(f"mla-retrofit {' '.join(cmd)} --help failed: {r.output}")
            text = re.sub(r"\x1b\[[0-9;]*m", "", r.output)
            title = " ".join(["mla-retrofit", *cmd])
            parts.append(f"## `{title}`\n\n```\n" + "\n".join(l.rstrip() for l in text.strip().splitlines()) + "\n```\n")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "\n".join(parts)


def main() -> None:
    PAGE.write_text(render())


if __name__ == "__main__":
    main()

"""Regenerate docs/cli.md from the CLI's own --help (so the page never drifts from the code).

    python scripts/cli_docs.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ["COLUMNS"] = "110"
os.environ["NO_COLOR"] = "1"
os.environ["TERM"] = "dumb"

from typer.testing import CliRunner  # noqa: E402

from mla_retrofit_cli.main import app  # noqa: E402

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


def main() -> None:
    runner = CliRunner()
    parts = [INTRO]
    for cmd in ([], ["convert"], ["heal"], ["bench"], ["inspect"], ["export"]):
        r = runner.invoke(app, [*cmd, "--help"], terminal_width=110, prog_name="mla-retrofit")
        if r.exit_code != 0:
            continue
        text = re.sub(r"\x1b\[[0-9;]*m", "", r.output)
        title = " ".join(["mla-retrofit", *cmd])
        parts.append(f"## `{title}`\n\n```\n" + "\n".join(l.rstrip() for l in text.strip().splitlines()) + "\n```\n")
    Path(__file__).resolve().parents[1].joinpath("docs", "cli.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()

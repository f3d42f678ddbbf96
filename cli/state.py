"""The small recorded run state that lets a bare ``heal`` or ``bench`` pick up the last conversion/heal."""

from __future__ import annotations

import json
from pathlib import Path

STATE_DIR = ".mla-retrofit"
STATE_FILE = "state.json"


def _path(cwd: Path | None = None) -> Path:
    return (cwd or Path.cwd()) / STATE_DIR / STATE_FILE


def load(cwd: Path | None = None) -> dict:
    p = _path(cwd)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def record(kind: str, output: str, cwd: Path | None = None, **extra) -> None:
    """Remember the output of the last ``convert`` or ``heal`` run in this directory."""
    p = _path(cwd)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = load(cwd)
    state[kind] = {"output": str(Path(output).resolve()), **extra}
    if kind == "convert":
        state.pop("heal", None)  # a new conversion supersedes the previous heal
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(p)


def last(kind: str, cwd: Path | None = None) -> str | None:
    entry = load(cwd).get(kind)
    if entry and Path(entry["output"]).exists():
        return entry["output"]
    return None

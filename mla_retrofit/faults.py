"""Deterministic fault injection for the crash-safety tests.

``MLA_RETROFIT_KILL_AT=NAME:K`` makes the process kill itself with SIGKILL the K-th time it passes the
point called NAME (``faults.point(NAME)``), so a test can stop a run at an exact step (mid-calibration,
between two tensors of a shard, inside a checkpoint rotation) and check that a resumed run ends with the
same bytes as an uninterrupted one. Unset (always, outside tests) a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("MLA_RETROFIT_KILL_AT")
    if not spec:
        return None
    name, _, k = spec.rpartition(":")
    return name, int(k)


def point(name: str) -> None:
    target = _target()
    if target is None or target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)

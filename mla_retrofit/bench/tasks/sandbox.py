"""Run one generated program in its own subprocess: a temporary directory, a time limit, a memory limit, and a
guard that ends the program at the first attempt to write outside that directory or to start other programs.

This is containment for benchmark code written by a model, not a security boundary against a hostile author
(a determined program can still reach the system through ``ctypes``); run task benchmarks on a machine you can
afford to lose, as with any code-generation evaluation.

A program passes when it exits with status 0 within the limits. Everything else is a failure with a reason:
``failed`` (an exception or a failed assertion), ``timeout``, ``memory``, ``forbidden`` (the guard stopped it).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORBIDDEN_EXIT = 97  # the guard's exit status

# Runs before the program, in its interpreter. Writes are checked against the sandbox directory; process creation,
# signals to others, and deletions are refused outright. It ends the process (os._exit) rather than raising, so a
# program cannot catch the refusal and go on to pass.
GUARD = r'''
import builtins, io, os, shutil, subprocess, sys
_ROOT = os.path.realpath(os.getcwd())
_exit = os._exit
def _stop(what):
    sys.stderr.write("sandbox: refused " + what + "\n"); sys.stderr.flush(); _exit(%d)
def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path))
    except TypeError:
        return True
    return p == _ROOT or p.startswith(_ROOT + os.sep)
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if not isinstance(file, int) and any(c in mode for c in "wax+") and not _inside(file):
        _stop("write to " + str(file))
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded_open
_os_open = os.open
def _guarded_os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        _stop("write to " + str(path))
    return _os_open(path, flags, *a, **k)
os.open = _guarded_os_open
def _refuse(name):
    def f(*a, **k):
        _stop(name)
    return f
for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execvp",
              "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "kill", "killpg",
              "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
              "chown", "symlink", "link", "putenv", "chdir", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse("os." + _name))
subprocess.Popen = _refuse("subprocess")
shutil.rmtree = _refuse("shutil.rmtree")
shutil.move = _refuse("shutil.move")
del _name
''' % FORBIDDEN_EXIT


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout | memory | forbidden
    detail: str = ""


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Execute ``source`` under the guard in a fresh temporary directory; never raises for the program's faults."""
    with tempfile.TemporaryDirectory(prefix="mla-task-") as tmp:
        Path(tmp, "program.py").write_text(GUARD + "\ndel builtins, io, shutil, subprocess\n" + source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(memory_mb << 20, int(timeout_s) + 1))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", f"over {timeout_s:g} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = err.decode("utf-8", "replace").strip()
        last = text.splitlines()[-1] if text else ""
        if proc.returncode == 0:
            return Outcome(True, "passed")
        if proc.returncode == FORBIDDEN_EXIT and "sandbox: refused" in text:
            return Outcome(False, "forbidden", last)
        if "MemoryError" in text or proc.returncode in (-signal.SIGKILL, -signal.SIGSEGV) and not last:
            return Outcome(False, "memory", last or "killed")
        if proc.returncode == -signal.SIGXCPU:
            return Outcome(False, "timeout", "CPU time limit")
        return Outcome(False, "failed", last[:300])

"""Runs on the real embedded SmolLM2-135M-Instruct (marked slow: `pytest -m slow`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lossless_smollm2_generates_the_same_32_tokens():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "lossless_smollm2.py")], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "same 32 tokens: True" in r.stdout

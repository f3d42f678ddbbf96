import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, save_tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """``tiny_src(family, layers=2)`` -> directory of a saved tiny random model (cached per session)."""
    cache = {}

    def make(family: str, layers: int = 2) -> Path:
        key = (family, layers)
        if key not in cache:
            cache[key] = save_tiny(family, tmp_path_factory.mktemp(f"{family}{layers}"), layers)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def converted(tiny_src, tmp_path_factory):
    """``converted(family, ratio, layers=2, **cfg)`` -> directory of a converted tiny model (cached)."""
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    cache = {}

    def make(family: str, ratio: float, layers: int = 2, **kw) -> Path:
        key = (family, ratio, layers, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"mla-{family}") / "out"
            cfg = dict(calib_samples=8, calib_seq_len=96, eval_samples=2, eval_seq_len=64)
            cfg.update(kw)
            convert(ConvertConfig(model=str(tiny_src(family, layers)), output=str(out), kv_ratio=ratio, **cfg))
            cache[key] = out
        return cache[key]

    return make


__all__ = ["FAMILIES"]

"""Killed conversions: nothing that looks complete is left, and ``--resume`` ends with the bytes of an
uninterrupted run. Kills are real SIGKILLs at exact points (``mla_retrofit.faults``), in a child process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mla_retrofit.checkpoint import SafetensorsFile
from mla_retrofit.convert.pipeline import ConvertConfig, convert
from mla_retrofit.errors import UserError
from tiny import save_tiny

FAST = dict(calib_samples=4, calib_seq_len=64, eval_samples=1, eval_seq_len=32)


def outputs(directory: Path) -> dict[str, bytes]:
    """The files that must be identical between runs (weights, index, config)."""
    names = [p for p in sorted(directory.iterdir()) if p.suffix == ".safetensors" or p.name in
             ("model.safetensors.index.json", "config.json")]
    return {p.name: p.read_bytes() for p in names}


def run_killed(src: Path, out: Path, kill_at: str, **kw) -> int:
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(2)
        from mla_retrofit.convert.pipeline import ConvertConfig, convert
        convert(ConvertConfig(model={str(src)!r}, output={str(out)!r}, **{dict(FAST, **kw)!r}))
    """)
    env = {**os.environ, "MLA_RETROFIT_KILL_AT": kill_at}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def src3(tmp_path_factory) -> Path:
    return save_tiny("qwen2", tmp_path_factory.mktemp("q3") / "src", layers=3)  # q/k/v biases


@pytest.fixture(scope="module")
def reference(src3, tmp_path_factory):
    """Uninterrupted conversions, by --propagate mode."""
    made = {}

    def get(propagate: str) -> Path:
        if propagate not in made:
            out = tmp_path_factory.mktemp(f"ref-{propagate}") / "out"
            convert(ConvertConfig(model=str(src3), output=str(out), propagate=propagate, **FAST))
            made[propagate] = out
        return made[propagate]

    return get


def test_conversion_is_deterministic(src3, reference, tmp_path):
    again = tmp_path / "again"
    convert(ConvertConfig(model=str(src3), output=str(again), **FAST))
    assert outputs(again) == outputs(reference("original"))


def kill_points(ref: Path) -> list[str]:
    """Mid-calibration, mid-write of layer 0's and layer 1's partial files, mid-assembly, after the embeddings."""
    per_layer = sum(1 for k in SafetensorsFile(ref / "model.safetensors").keys() if k.startswith("model.layers.1."))
    n_layers = 3
    return ["convert.calibrate:2", "write.tensor:3", f"write.tensor:{per_layer + 2}",
            f"write.tensor:{n_layers * per_layer + per_layer + 1}", "convert.rest:1"]


@pytest.mark.parametrize("propagate", ["original", "converted"])
def test_killed_conversion_resumes_to_identical_bytes(src3, reference, tmp_path, propagate):
    ref = reference(propagate)
    points = kill_points(ref) if propagate == "original" else kill_points(ref)[1:3]
    for n, point in enumerate(points):
        out = tmp_path / f"out{n}"
        assert run_killed(src3, out, point, propagate=propagate) == -9, point
        assert not out.exists(), point  # nothing that looks complete
        cfg = ConvertConfig(model=str(src3), output=str(out), propagate=propagate, **FAST)
        if n == 0:
            with pytest.raises(UserError, match="partial conversion of these settings exists.*--resume"):
                convert(cfg)
            with pytest.raises(UserError, match="other settings.*calib_samples"):
                convert(ConvertConfig(**{**cfg.__dict__, "calib_samples": 5, "resume": True}))
        cfg.resume = True
        result = convert(cfg)
        assert outputs(out) == outputs(ref), point
        assert [r.rank for r in result.layers] == [r["rank"] for r in __import__("json").loads(
            (ref / "conversion.json").read_text())["layers"]]
        assert not (tmp_path / f".out{n}.partial").exists()


def test_overwrite_discards_a_partial_run(src3, reference, tmp_path):
    out = tmp_path / "out"
    assert run_killed(src3, out, "convert.calibrate:2") == -9
    convert(ConvertConfig(model=str(src3), output=str(out), overwrite=True, **FAST))
    assert outputs(out) == outputs(reference("original"))


def test_a_model_larger_than_one_shard_links_its_layer_files_as_shards(src3, reference, tmp_path, monkeypatch):
    """Above the shard cap each converted layer's file becomes a shard (hard link, no copy); the tensors are
    the bytes of the one-file output, the index names them all, and transformers loads the result."""
    import json

    from mla_retrofit import checkpoint
    from mla_retrofit.sources import load_model

    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 100_000)
    out = tmp_path / "out"
    convert(ConvertConfig(model=str(src3), output=str(out), **FAST))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and not (out / "model.safetensors").exists()
    one = SafetensorsFile(reference("original") / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(one.keys())
    for name, shard in index["weight_map"].items():
        f = SafetensorsFile(out / shard)
        assert f.raw(name) == one.raw(name) and f.entries[name]["shape"] == one.entries[name]["shape"], name
    assert index["metadata"]["total_size"] == sum(len(one.raw(k)) for k in one.keys())
    load_model(str(out))  # the shards and index load


def test_killed_inside_the_output_swap_keeps_the_old_output_and_resumes(src3, reference, tmp_path):
    """--overwrite over an existing OUT, killed after the old OUT moved aside and before the new one moved in:
    the next run puts the old OUT back, and --resume --overwrite finishes with the uninterrupted bytes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-result").write_text("previous conversion")
    assert run_killed(src3, out, "atomic.swap:1", overwrite=True) == -9
    assert not out.exists() and list(tmp_path.glob(".out.old-*"))  # the old output is aside, not lost
    convert(ConvertConfig(model=str(src3), output=str(out), resume=True, overwrite=True, **FAST))
    assert outputs(out) == outputs(reference("original")) and not (out / "old-result").exists()
    assert not list(tmp_path.glob(".out.*"))
    notes = __import__("json").loads((out / "conversion.json").read_text())["notes"]
    assert any(n.startswith("resumed (3/3 layers calibrated, 3/3 converted)") for n in notes), notes

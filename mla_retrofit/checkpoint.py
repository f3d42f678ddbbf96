"""Writing checkpoints: size-capped safetensors shards, an index, and atomic placement of the whole directory.

Everything is written into a temporary sibling directory and moved into place
only when complete, so an interrupted run never leaves an output that looks
finished. A leftover temporary directory from a killed run is removed on the
next attempt.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UserError

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_mla.py", "modeling_mla.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mla.MLARetrofitConfig",
    "AutoModelForCausalLM": "modeling_mla.MLARetrofitForCausalLM",
}
COMPLETE_MARKER = "conversion.json"


class ShardWriter:
    """Accumulates tensors and writes a shard whenever ``max_bytes`` is reached; :meth:`close` writes the index."""

    def __init__(self, directory: Path, max_bytes: int = 2 * 1024**3):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files):05d}.tmp.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.directory / self.files[0][0]).rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / tmp).rename(self.directory / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} already exists and is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block finishes."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def write_modeling_code(directory: Path) -> None:
    for name in MODELING_FILES:
        shutil.copy2(MODELING_DIR / name, directory / name)


def save_mla_model(model, directory: Path, tokenizer=None, extra_files: dict[str, str] | None = None) -> None:
    """Save an in-memory MLA model as a self-contained checkpoint (weights, config, modeling code)."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_modeling_code(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)

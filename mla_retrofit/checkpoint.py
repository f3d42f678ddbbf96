"""Writing checkpoints: size-capped safetensors shards, an index, and atomic placement of the whole directory.

Everything is written into a temporary sibling directory and moved into place
only when complete, so an interrupted run never leaves an output that looks
finished. A leftover temporary directory from a killed run is removed on the
next attempt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from . import faults
from .errors import UserError

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_mla.py", "modeling_mla.py", "cache_mla.py", "rope_mla.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mla.MLARetrofitConfig",
    "AutoModelForCausalLM": "modeling_mla.MLARetrofitForCausalLM",
}


#: Shard size cap of everything mla-retrofit writes.
MAX_SHARD_BYTES = 2 * 1024**3

#: safetensors dtype names <-> torch dtypes.
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ST_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class SafetensorsFile:
    """Reads tensors from one safetensors file with plain ``pread`` calls, never ``mmap``.

    A memory-mapped file keeps every page it has touched in the process's resident set until it is
    unmapped; reading layer by layer through a map therefore grows RSS to the size of the whole checkpoint.
    Plain reads go through the page cache, which the kernel reclaims and RSS does not count.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(self._fd).st_size
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(os.pread(self._fd, n, 8))
        except BaseException:
            os.close(self._fd)
            raise
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.entries: dict = header
        self._base = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._base + end > size:
            os.close(self._fd)
            raise ValueError(f"truncated: data ends at byte {self._base + end}, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> bytearray:
        """The tensor's bytes, read straight into one buffer (no intermediate copy)."""
        b, e = self.entries[name]["data_offsets"]
        buf = bytearray(e - b)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(self._fd, [view[done : done + (1 << 30)]], self._base + b + done)
            if n <= 0:
                raise ValueError(f"short read of '{name}'")
            done += n
        return buf

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor '{name}' has dtype {entry['dtype']}, which mla-retrofit does not read")
        buf = self.raw(name)
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class ShardWriter:
    """Streams tensors to size-capped safetensors shards; at most one tensor is held in memory.

    Each tensor's bytes go to a scratch file for its alignment class as soon as it is added; a full shard
    is then written as header + the classes from the widest element down, so every tensor is aligned to its
    element size (as the reference writer arranges) without holding the shard in memory. The layout depends
    only on the names, dtypes, shapes and order of the tensors added, so equal inputs give equal bytes.
    :meth:`close` names the shards (``model.safetensors`` alone, else ``model-0000k-of-0000n`` + index).
    """

    def __init__(self, directory: Path, max_bytes: int | None = None, prefix: str = "shard", fault: str = "write.tensor"):
        self.directory = Path(directory)
        self.max_bytes = max_bytes or MAX_SHARD_BYTES
        self.prefix = prefix
        self.fault = fault
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._reset()

    def _reset(self) -> None:
        self.pending: dict[int, list[tuple[str, str, list[int], int]]] = {}
        self.pending_bytes = 0
        self._scratch: dict[int, object] = {}

    def _scratch_file(self, align: int):
        if align not in self._scratch:
            path = self.directory / f".{self.prefix}-{len(self.files):05d}.{align}.scratch"
            self._scratch[align] = open(path, "wb")
        return self._scratch[align]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in ST_NAMES:
            raise ValueError(f"cannot write '{name}': dtype {tensor.dtype} has no safetensors name here")
        self.add_raw(name, ST_NAMES[tensor.dtype], list(tensor.shape), _tensor_bytes(tensor))

    def add_raw(self, name: str, dtype: str, shape: list[int], data) -> None:
        size = len(data)
        if self.pending_bytes and self.pending_bytes + size > self.max_bytes:
            self.flush()
        align = ST_SIZES.get(dtype, 1)
        self._scratch_file(align).write(data)
        self.pending.setdefault(align, []).append((name, dtype, list(shape), size))
        self.pending_bytes += size
        self.total_bytes += size
        faults.point(self.fault)

    def adopt(self, path: Path, f: SafetensorsFile) -> None:
        """Take a finished safetensors file as the next shard, hard-linked into the directory (copied where
        links are impossible); the source file is left as it is."""
        self.flush()
        dest = self.directory / f"{self.prefix}-{len(self.files):05d}.tmp.safetensors"
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)
        self.files.append((dest.name, f.keys()))
        self.total_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in f.entries.values())
        faults.point(self.fault)

    def flush(self, metadata: dict | None = None) -> None:
        if not self.pending:
            return
        header, names, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, [], 0
        order = sorted(self.pending, reverse=True)
        for align in order:
            for name, dtype, shape, size in self.pending[align]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                names.append(name)
                offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path = self.directory / f"{self.prefix}-{len(self.files):05d}.tmp.safetensors"
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for align in order:
                f = self._scratch[align]
                f.close()
                with open(f.name, "rb") as src:
                    shutil.copyfileobj(src, out, 64 * 1024**2)
                os.unlink(f.name)
            out.flush()
            os.fsync(out.fileno())
        self.files.append((path.name, names))
        self._reset()

    def close(self, single_name: str = "model.safetensors", metadata: dict | None = None) -> None:
        self.flush(metadata)
        n = len(self.files)
        if n == 1:
            (self.directory / self.files[0][0]).rename(self.directory / single_name)
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


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def clean_stale(out: Path) -> None:
    """Remove the temporary and trash siblings a killed run left next to ``out``.

    A run killed between moving the old output aside and moving the new one in left no ``out``: the
    old one is put back first, so a crash never loses a finished output.
    """
    old = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if old and not out.exists():
        old[-1].rename(out)
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block finishes.

    An output that appears while the block runs is not replaced unless ``overwrite``: the finished
    result is then kept beside it (``OUT.conflict-*``) and the error says so.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    check_output(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _non_empty(out) and not overwrite:
        kept = out.parent / f"{out.name}.conflict-{uuid.uuid4().hex[:8]}"
        tmp.rename(kept)
        raise UserError(f"{out} appeared while this run was writing and was left untouched; the result is in {kept} "
                        "(move it into place, or rerun with --overwrite)")
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
        faults.point("atomic.swap")
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
    model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="2GB")
    write_modeling_code(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)

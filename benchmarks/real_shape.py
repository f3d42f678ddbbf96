"""Conversion at a real layer shape: wall time and peak memory against depth.

Builds a random-init Qwen2 checkpoint with the layer shape of Qwen2.5-1.5B or
Qwen2.5-7B (bf16, 1 GB shards, q/k/v biases, the embedded SmolLM2 tokenizer so
calibration text can be tokenised) and converts it in a child process at 50%
KV, measuring the child's peak RSS (its ``VmHWM``, sampled until it exits; it
counts mapped file pages too). Checkpoints are built in a separate process so
this script stays small: with ``vfork`` + ``exec`` a child's ``ru_maxrss``
starts from its parent's. Random weights measure memory and time, not quality.

    python benchmarks/real_shape.py --shape 1.5b --layers 8 16 28
    python benchmarks/real_shape.py --shape 7b --layers 28 --work /big/disk
    git worktree add ../old-checkout OLD_COMMIT
    python benchmarks/real_shape.py --layers 28 --compare ../old-checkout --repeat 2   # before/after

Checkpoints are cached under ``--work`` and reused; conversions are removed
after they are measured unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, q heads, kv heads, vocab, tied embeddings
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, tie_word_embeddings=False),
}


def build(shape: str, layers: int, directory: Path, shard_bytes: int = 1024**3) -> Path:
    """Write the checkpoint shard by shard (at most one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    if (directory / "model.safetensors.index.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = Qwen2Config(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                      dtype="bfloat16", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.save_pretrained(str(tmp))
    d, f = cfg.hidden_size, cfg.intermediate_size
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    g = torch.Generator().manual_seed(0)

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", w(cfg.vocab_size, d)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
            yield p + "self_attn.q_proj.weight", w(d, d)
            yield p + "self_attn.q_proj.bias", w(d, std=0.1)
            yield p + "self_attn.k_proj.weight", w(kv, d)
            yield p + "self_attn.k_proj.bias", w(kv, std=0.1)
            yield p + "self_attn.v_proj.weight", w(kv, d)
            yield p + "self_attn.v_proj.bias", w(kv, std=0.1)
            yield p + "self_attn.o_proj.weight", w(d, d)
            yield p + "mlp.gate_proj.weight", w(f, d)
            yield p + "mlp.up_proj.weight", w(f, d)
            yield p + "mlp.down_proj.weight", w(d, f)
        yield "model.norm.weight", torch.ones(d, dtype=torch.bfloat16)
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", w(cfg.vocab_size, d)

    shards, pending, size, total = [], {}, 0, 0
    for name, t in tensors():
        n = t.numel() * t.element_size()
        if pending and size + n > shard_bytes:
            shards.append(pending)
            save_file(pending, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            pending, size = {}, 0
        pending[name], size, total = t, size + n, total + n
    shards.append(pending)
    save_file(pending, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
    weight_map, n = {}, len(shards)
    for k, names in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{k}.safetensors").rename(tmp / final)
        weight_map.update({name: final for name in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    from mla_retrofit.sources import load_tokenizer

    load_tokenizer("default").save_pretrained(str(tmp))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def convert(src: Path, out: Path, calib_samples: int, code: Path | None = None) -> dict:
    """Convert in a child process (the library call the CLI makes), optionally with another checkout's code
    (``-P``: the working directory is not put on ``sys.path``, so ``PYTHONPATH`` decides which code runs)."""
    shutil.rmtree(out, ignore_errors=True)
    script = ("import sys; from mla_retrofit.convert.pipeline import ConvertConfig, convert; "
              f"convert(ConvertConfig(model={str(src)!r}, output={str(out)!r}, kv_ratio=0.5, "
              f"calib_samples={calib_samples}))")
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(Path(code).resolve())
    log = out.with_name(out.name + ".log")
    t0, hwm = time.time(), 0
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-P", "-c", script], stdout=f, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:  # VmHWM: this process's own high-water mark (ru_maxrss would include ours)
            try:
                with open(f"/proc/{proc.pid}/status") as st:
                    hwm = max([hwm] + [int(l.split()[1]) for l in st if l.startswith("VmHWM:")])
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert failed:\n{log.read_text()[-4000:]}")
    peak = hwm / 1024**2  # KiB -> GiB
    rec = json.loads((out / "conversion.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), "convert_seconds": rec["seconds"],
            "out_gib": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1024**3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 28])
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("MLA_RETROFIT_WORK", Path(tempfile.gettempdir()) / "mla-real-shape")))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--compare", type=Path, default=None,
                    help="another checkout's root (e.g. a git worktree of an older commit): each depth is converted "
                         "by it and by this one, alternating, --repeat times")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        for n in a.layers:
            build(a.shape, n, a.work / f"qwen2-{a.shape}-L{n}")
        return
    rows = []
    codes = [("this", None)] + ([("compare", a.compare)] if a.compare else [])
    for n in a.layers:
        src = a.work / f"qwen2-{a.shape}-L{n}"
        subprocess.run([sys.executable, __file__, "--build-only", "--shape", a.shape, "--layers", str(n),
                        "--work", str(a.work)], check=True)
        disk = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1024**3
        for rep in range(a.repeat):
            for label, code in (codes if rep % 2 == 0 else codes[::-1]):
                out = a.work / f"out-{a.shape}-L{n}"
                row = {"code": label, "shape": a.shape, "layers": n, "checkpoint_gib": round(disk, 2),
                       **convert(src, out, a.calib_samples, code)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)
    print("| code | shape | layers | checkpoint GiB | wall s | peak RSS GiB | output GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['shape']} | {r['layers']} | {r['checkpoint_gib']} | {r['wall_s']} | {r['peak_rss_gib']} "
              f"| {r['out_gib']} |")


if __name__ == "__main__":
    main()

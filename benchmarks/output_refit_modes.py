"""Two targets for a closed-form ``o_proj`` refit of a saved conversion, scored on held-out prose.

    python benchmarks/output_refit_modes.py CONVERTED --calib SAMPLES.jsonl+builtin [--windows 32 --ridges 0.1,1]

``drift`` (what ``convert --refit-output`` does, with ``heal --refit``'s solve): the converted residual stream
after each attention is fitted to the source's, from the converted model's own inputs, so each layer also
corrects the drift of the layers before it. ``local``: each layer's attention output is fitted to the source
attention's output on the same (converted) inputs. Both walk the layers in order on the calibration windows,
the converted model's inputs recomputed after each refit. Prints one JSON line per mode and ridge: fidelity on
Austen's *Persuasion* (heldout.py) against the original.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mla_retrofit import data
from mla_retrofit.bench.fidelity import compare
from mla_retrofit.convert.config import calib_parts
from mla_retrofit.heal import models
from mla_retrofit.heal.refit import _Record, refit_output_projections, solve
from mla_retrofit.masks import causal_mask
from mla_retrofit.sources import EMBEDDED_DEFAULT, load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))


@torch.no_grad()
def local_refit(student, teacher, ids, pos, ridge: float) -> None:
    m, tm = student.model, teacher.model
    mask = causal_mask(student.config, m.embed_tokens(ids[:1]), pos[:1])
    hs = [m.embed_tokens(ids[b : b + 1]) for b in range(ids.shape[0])]
    for i, layer in enumerate(m.layers):
        zz = yz = 0
        for h in hs:
            pe = m.rotary_emb(h, pos[:1])
            z_rec, x_rec = _Record(), _Record()
            handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mm, a, k, r=z_rec: r(mm, a, k),
                                                                        with_kwargs=True),
                       layer.self_attn.register_forward_pre_hook(lambda mm, a, k, r=x_rec: r(mm, a, k), with_kwargs=True)]
            layer(hidden_states=h, attention_mask=mask, position_embeddings=pe, position_ids=pos[:1])
            for handle in handles:
                handle.remove()
            y = tm.layers[i].self_attn(hidden_states=x_rec.value, position_embeddings=tm.rotary_emb(h, pos[:1]),
                                       attention_mask=mask)[0]
            z, y = z_rec.value.reshape(-1, z_rec.value.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            if layer.self_attn.o_proj.bias is not None:
                y = y - layer.self_attn.o_proj.bias.double()
            zz, yz = zz + z.T @ z, yz + y.T @ z
        o = layer.self_attn.o_proj
        o.weight.copy_(solve(zz, yz, o.weight, ridge).to(o.weight.dtype))
        hs = [layer(hidden_states=h, attention_mask=mask, position_embeddings=m.rotary_emb(h, pos[:1]),
                    position_ids=pos[:1]) for h in hs]
        hs = [h[0] if isinstance(h, tuple) else h for h in hs]


def add_refit_args(ap: argparse.ArgumentParser, ridges: str) -> None:
    """The arguments a refit of a saved conversion shares: the model, its calibration text and the ridges."""
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="the conversion's calibration spec (e.g. its saved samples + builtin)")
    ap.add_argument("--calib-seed", type=int, default=1)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ridges", default=ridges)
    ap.add_argument("--eval-windows", type=int, default=24)


def calibration_windows(tok, spec: str, n: int, seed: int, seq_len: int = 512) -> torch.Tensor:
    """A conversion's calibration windows from its spec (``SAMPLES.jsonl+builtin``): an equal share of each part,
    interleaved, as ``convert`` cuts them."""
    parts = calib_parts(spec)
    got = [data.token_windows(data.texts(p, tok), tok, n // len(parts), seq_len, seed=seed) for p in parts]
    return torch.stack([w for j in range(max(map(len, got))) for w in (g[j] for g in got if j < len(g))])


def main() -> None:
    ap = argparse.ArgumentParser()
    add_refit_args(ap, ridges="0.1,1")
    ap.add_argument("--modes", default="drift,local")
    args = ap.parse_args()
    from heldout import windows

    tok = load_tokenizer(EMBEDDED_DEFAULT)
    ids = calibration_windows(tok, args.calib, args.windows, args.calib_seed)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    teacher = models.load_teacher(EMBEDDED_DEFAULT, torch.float32).eval()
    baseline = load_model(EMBEDDED_DEFAULT)
    ev = windows(tok, args.eval_windows, 512)
    print(json.dumps({"mode": "none", **compare(load_model(args.model), baseline, ev).as_dict()}), flush=True)
    for mode in args.modes.split(","):
        for ridge in map(float, args.ridges.split(",")):
            student = models.load_student(args.model).eval()
            if mode == "drift":
                mask = causal_mask(student.config, student.model.embed_tokens(ids), pos)
                refit_output_projections(student, teacher, ids, pos, mask, ridge)
            else:
                local_refit(student, teacher, ids, pos, ridge)
            row = {"mode": mode, "ridge": ridge, "windows": ids.shape[0], **compare(student, baseline, ev).as_dict()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

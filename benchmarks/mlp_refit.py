"""A second closed-form step after convert's output refit: refit each layer's ``mlp.down_proj`` too, scored on
held-out prose. A measured negative (docs/benchmarks.md §9, "The output refit"), kept so it can be rerun.

    python benchmarks/mlp_refit.py CONVERTED --calib CONVERTED/data/teacher-samples.jsonl+builtin [--ridges 1,0.1]

Walks the layers of a saved conversion (made with the output refit, the default) in order on its 32 calibration
windows: the converted residual stream after each attention is ``r``, the MLP's input to ``down_proj`` is ``u``,
and ``down_proj`` is refit by ridge least squares toward its weights (``heal.refit.solve``) so that
``r + W u`` lands on the source's output of that layer (the drift target, as the output refit's). ``--stride k``
fits on every k-th token only (the cheaper form convert could afford). Prints one JSON line per ridge: fidelity
on Austen's *Persuasion* (heldout.py) against the original.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mla_retrofit.bench.fidelity import compare
from mla_retrofit.heal import models
from mla_retrofit.heal.refit import _Record
from mla_retrofit.ridge import moment_error, solve
from mla_retrofit.sources import EMBEDDED_DEFAULT, load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from heldout import windows  # noqa: E402
from output_refit_modes import add_refit_args, calibration_windows  # noqa: E402

BATCH = 8


@torch.no_grad()
def source_streams(teacher, ids, pos) -> list[list[torch.Tensor]]:
    """Per layer, per batch: the source's output of that layer on the calibration windows."""
    outs = [[] for _ in teacher.model.layers]
    for b in range(0, ids.shape[0], BATCH):
        recs, handles = [], []
        for layer in teacher.model.layers:
            rec = _Record()
            handles.append(layer.register_forward_hook(lambda m, a, k, o, r=rec: r(m, a, k, o), with_kwargs=True))
            recs.append(rec)
        try:
            teacher.model(input_ids=ids[b : b + BATCH], position_ids=pos, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for i, rec in enumerate(recs):
            outs[i].append(rec.value.float())
    return outs


@torch.no_grad()
def refit_mlps(student, outs, ids, pos, ridge: float, stride: int) -> list[tuple[float, float]]:
    """Refit every layer's ``down_proj`` in place; per layer, the relative error of its target before/after."""
    m = student.model
    hs = [m.embed_tokens(ids[b : b + BATCH]) for b in range(0, ids.shape[0], BATCH)]
    cos, sin = m.rotary_emb(hs[0], pos)
    errors = []
    for i, layer in enumerate(m.layers):
        attn, mlp = layer.self_attn, layer.mlp
        rs, us = [], []
        uu = yu = 0
        yy = 0.0
        for j, h in enumerate(hs):
            pe = (cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1))
            r = h + attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
            n = layer.post_attention_layernorm(r)
            u = mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n)
            y = outs[i][j] - r
            uf, yf = u.reshape(-1, u.shape[-1])[::stride], y.reshape(-1, y.shape[-1])[::stride]
            uu, yu = uu + (uf.T @ uf).double(), yu + (yf.T @ uf).double()
            yy += float(yf.double().square().sum())
            rs.append(r)
            us.append(u)
        w0 = mlp.down_proj.weight.double()
        w = solve(uu, yu, w0, ridge)
        errors.append((moment_error(w0, uu, yu, yy), moment_error(w, uu, yu, yy)))
        mlp.down_proj.weight.copy_(w.to(mlp.down_proj.weight.dtype))
        hs = [r + mlp.down_proj(u) for r, u in zip(rs, us)]
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    add_refit_args(ap, ridges="1")
    ap.add_argument("--stride", type=int, default=1)
    args = ap.parse_args()

    tok = load_tokenizer(EMBEDDED_DEFAULT)
    ids = calibration_windows(tok, args.calib, args.windows, args.calib_seed)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    teacher = models.load_teacher(EMBEDDED_DEFAULT, torch.float32).eval()
    outs = source_streams(teacher, ids, pos)
    del teacher
    baseline = load_model(EMBEDDED_DEFAULT)
    ev = windows(tok, args.eval_windows, 512)
    for ridge in map(float, args.ridges.split(",")):
        student = models.load_student(args.model).eval()
        errors = refit_mlps(student, outs, ids, pos, ridge, args.stride)
        median = sorted(e[1] / max(e[0], 1e-30) for e in errors)[len(errors) // 2]
        row = {"ridge": ridge, "stride": args.stride, "windows": ids.shape[0], "median_error_ratio": round(median, 4),
               **compare(student, baseline, ev).as_dict()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

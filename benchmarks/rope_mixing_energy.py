"""How much of a layer's RoPE key energy one mixed component per frequency holds: real against complex mixing.

    python benchmarks/rope_mixing_energy.py [MODEL] [--windows 4] [--seq-len 512] [--seed 1] [--frequencies 24]

For every layer and each of the ``--frequencies`` fastest frequencies (the ones the engine form's DeepSeek
table keeps at 50% KV on SmolLM2), the KV heads' key pairs are mixed (``convert/rope.py``) and only the first
component is kept, as the DeepSeek layout does. Printed: the query-weighted squared error of the heads' keys
rebuilt from that component, ``sum_j w_j E|kappa_j - conj(U[0, j]) kappa'_0|^2``, as a share of
``sum_j w_j E|kappa_j|^2`` (``w_j`` the query energy that reads head ``j``'s pair), summed over layers and
frequencies, for four mixes: the eigenbasis of the real or the Hermitian (complex) key second moment, each
with and without the query weighting. Text: ``builtin`` (stdlib docstrings), ``--windows`` windows.
"""

from __future__ import annotations

import argparse

import torch

from mla_retrofit.convert import rope
from mla_retrofit.data import builtin_texts, token_windows
from mla_retrofit.sources import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--frequencies", type=int, default=24)
    args = ap.parse_args()

    model, tok = load_model(args.model), load_tokenizer(args.model)
    cfg = model.config
    h = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv, n_heads, half = cfg.num_key_value_heads, cfg.num_attention_heads, h // 2
    ids = torch.as_tensor(token_windows(builtin_texts(), tok, args.windows, args.seq_len, seed=args.seed))
    keys, queries = {}, {}

    def keep(store, i):
        return lambda _m, _a, out: store.setdefault(i, []).append(out.detach().double())

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(keep(keys, i))
        layer.self_attn.q_proj.register_forward_hook(keep(queries, i))
    with torch.no_grad():
        for s in range(0, ids.shape[0], 4):
            model(ids[s : s + 4])

    lost = {name: 0.0 for name in ("real", "real, query-weighted", "complex", "complex, query-weighted")}
    total = 0.0
    for i in range(len(model.model.layers)):
        k = torch.cat(keys[i]).reshape(-1, n_kv * h)
        q = torch.cat(queries[i]).reshape(-1, n_heads, h)
        m2 = k.T @ k / k.shape[0]
        q_energy = (q[..., :half] ** 2 + q[..., half:] ** 2).mean(0).view(n_kv, n_heads // n_kv, half).sum(1)
        kappa = torch.complex(k.view(-1, n_kv, h)[..., :half], k.view(-1, n_kv, h)[..., half:])  # [N, n_kv, h/2]
        mixes = {
            "real": rope.frequency_mixing(m2, n_kv, h),
            "real, query-weighted": rope.frequency_mixing(m2, n_kv, h, query_weight=q_energy),
            "complex": rope.frequency_mixing(m2, n_kv, h, complex_mixing=True),
            "complex, query-weighted": rope.frequency_mixing(m2, n_kv, h, query_weight=q_energy, complex_mixing=True),
        }
        for t in range(args.frequencies):
            x, w = kappa[:, :, t], q_energy[:, t]
            total += float((x.abs().square().mean(0) * w).sum())
            for name, mix in mixes.items():
                u = rope.at_precision(mix)[t, 0].to(torch.complex128)  # kappa'_0 = sum_j u_j kappa_j
                rebuilt = (x @ u)[:, None] * u.conj()[None, :]
                lost[name] += float(((x - rebuilt).abs().square().mean(0) * w).sum())
    print(f"{args.model}: {len(model.model.layers)} layers, {n_kv} KV heads, the {args.frequencies} fastest "
          f"frequencies, {args.windows} x {args.seq_len} tokens of builtin")
    for name, v in lost.items():
        print(f"  {name:<26} first component leaves {100 * v / total:5.2f}% of the query-weighted key energy")


if __name__ == "__main__":
    main()

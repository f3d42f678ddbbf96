"""Export a native MLA checkpoint to the stock transformers DeepSeek-V3 format (no remote code).

Steps, one layer's weights in memory at a time:

1. read the native config and refuse what DeepSeek-V3 cannot express
   (Qwen3-style nonlinear latent, MLP biases, per-layer ranks unless padded,
   RoPE frequencies no single DeepSeek table holds);
2. plan the target: one ``kv_lora_rank`` (+1 constant channel that turns
   ``kv_a_layernorm`` into a fixed rescale), a RoPE table (``rope_theta``,
   slots), the softmax-scale folding, ``q_lora`` only to carry a query bias;
3. per layer: rewrite the attention (:mod:`.attention`), copy the dense MLP,
   write, and push both the native and the exported layer through a short
   token stream (:mod:`.verify`);
4. write embeddings, an explicit ``lm_head``, config, tokenizer files,
   ``export.json`` (settings, cache cost, measured fidelity) and a model card.

The whole directory appears only when complete (:func:`atomic_dir`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import ShardWriter, atomic_dir
from ..errors import UserError
from ..modeling.modeling_mla import MLARetrofitRotaryEmbedding
from .latent_norm import DS_NORM_EPS
from .attention import LayerGeometry, NativeAttention, attention_tensors
from .rope_table import RopeTable, fit_rope_table
from .settings import (FLASHMLA_ROPE, MLP_AND_NORMS, TOKENIZER_FILES, ExportConfig, ExportReport,
                       out_dtype, plan_rank, read_native_config, refuse_inexpressible)
from .verify import StreamCheck

__all__ = ["ExportConfig", "ExportReport", "DeepseekExporter", "export_deepseek"]

# -- the exporter --------------------------------------------------------------------------------------

class DeepseekExporter:
    def __init__(self, cfg: ExportConfig):
        from ..sources import SafetensorsWeights

        cfg.validate()
        self.cfg = cfg
        self.src = Path(cfg.model)
        if not self.src.is_dir():
            raise UserError(f"model directory {self.src} does not exist")
        self.native, native_dtype = read_native_config(self.src)
        refuse_inexpressible(self.native)
        self.weights = SafetensorsWeights(self.src)
        self.notes: list[str] = []
        self.dtype = out_dtype(cfg.dtype, native_dtype, self.notes)
        self.dropped: dict[str, float] = {}
        self.plan()

    # -- planning ----------------------------------------------------------------------------------
    def plan(self) -> None:
        c, cfg = self.native, self.cfg
        h = c.head_dim
        rope_dims = [2 * len(f) for f in c.rope_freq_idx]
        if cfg.flashmla and max(rope_dims) > FLASHMLA_ROPE:
            raise UserError(
                f"FlashMLA needs qk_rope_head_dim {FLASHMLA_ROPE}; this model keeps {max(rope_dims)} RoPE dims per layer: "
                f"re-convert with --rope-dim {FLASHMLA_ROPE} (or less) and --rope-layout deepseek"
            )
        self.rank = plan_rank(c.kv_lora_ranks, 0 if cfg.engine else 1, cfg.pad_ranks, cfg.flashmla)
        # Engines normalise the latent with the config's rms_norm_eps, transformers with 1e-6: the engine form
        # uses 1e-6 everywhere and scales the residual stream by s = sqrt(1e-6 / eps), which leaves every
        # RMSNorm's output unchanged (norm(s h; s^2 eps) = norm(h; eps)).
        self.eps = DS_NORM_EPS if cfg.engine else c.rms_norm_eps
        self.resid_scale = math.sqrt(DS_NORM_EPS / c.rms_norm_eps) if cfg.engine else 1.0
        src_inv, self.src_scaling = MLARetrofitRotaryEmbedding.compute_inv_freq(c)
        self.table: RopeTable = fit_rope_table(
            c.rope_freq_idx, src_inv, dict(c.rope_parameters), h, c.max_position_embeddings,
            pad=cfg.pad_rope, target_pairs=FLASHMLA_ROPE // 2 if cfg.flashmla else None,
            yarn=cfg.engine and cfg.yarn_rope,
        )
        self.notes.extend(self.table.notes)
        q_bias = self.weights.has("model.layers.0.self_attn.q_proj.bias")
        q_rows = c.num_attention_heads * (h + self.table.dim)
        q_lora = min(c.hidden_size, q_rows) + 1 if (q_bias and not cfg.engine) else None
        self.ds_config = self.build_ds_config(q_lora)
        s_ds = self.ds_softmax_scale()
        alpha = h**-0.5 / s_ds
        self.geometry = LayerGeometry(
            n_heads=c.num_attention_heads, kv_groups=c.kv_groups, head_dim=h, hidden=c.hidden_size,
            kv_lora_rank=self.rank, rope_pairs=self.table.n_pairs, interleave=cfg.rope_interleave, alpha=alpha,
            alpha_rope=alpha * self.src_scaling**2 / self.table.attention_scaling**2, q_lora_rank=q_lora,
        )
        if c.hidden_act != "silu":
            self.notes.append(f"hidden_act is '{c.hidden_act}'; transformers honours it, engines' DeepSeek MLPs expect silu")
        if c.sliding_window is not None:
            self.notes.append(
                f"the native model attends within a sliding window of {c.sliding_window} tokens; DeepSeek-V3 has "
                "none, so the export matches only for contexts up to that length"
            )

    def ds_softmax_scale(self) -> float:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

        return float(yarn_apply_mscale(self.table.rope_parameters, self.ds_config.qk_head_dim**-0.5))

    def build_ds_config(self, q_lora: int | None):
        from transformers import DeepseekV3Config

        c, n_layers = self.native, self.native.num_hidden_layers
        cfg = DeepseekV3Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            moe_intermediate_size=c.intermediate_size, num_hidden_layers=n_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
            n_shared_experts=1, n_routed_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1,
            num_experts_per_tok=1, first_k_dense_replace=n_layers, norm_topk_prob=True,
            kv_lora_rank=self.rank, q_lora_rank=q_lora, qk_rope_head_dim=self.table.dim,
            qk_nope_head_dim=c.head_dim, v_head_dim=c.head_dim, hidden_act=c.hidden_act,
            max_position_embeddings=c.max_position_embeddings, initializer_range=c.initializer_range,
            rms_norm_eps=self.eps, use_cache=True, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id, tie_word_embeddings=False, rope_parameters=dict(self.table.rope_parameters),
            rope_interleave=self.cfg.rope_interleave, attention_bias=not self.cfg.engine, attention_dropout=0.0,
            num_mtp_layers=0,
        )
        cfg.architectures = ["DeepseekV3ForCausalLM"]
        cfg.dtype = self.dtype
        return cfg

    # -- per layer -----------------------------------------------------------------------------------
    def native_layer(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        return {k[len(prefix):]: self.weights.get(k) for k in self.weights.names() if k.startswith(prefix)}

    def native_attention(self, state: dict[str, torch.Tensor]) -> NativeAttention:
        def get(name):
            t = state.get("self_attn." + name)
            return None if t is None else t.double()

        return NativeAttention(
            q_w=get("q_proj.weight"), q_b=get("q_proj.bias"), kv_a_w=get("kv_a_proj.weight"),
            kv_a_b=get("kv_a_proj.bias"), q_rope=get("q_rope"), k_up=get("k_up.weight"), v_up=get("v_up.weight"),
            o_w=get("o_proj.weight"), o_b=get("o_proj.bias"), input_norm=state["input_layernorm.weight"].double(),
        )

    def layer_tensors(self, i: int, state: dict):
        nat = self.native_attention(state)
        attn, channels = attention_tensors(nat, self.geometry, self.table.slots[i], not self.cfg.engine)
        out = {f"self_attn.{k}": v for k, v in attn.items()}
        out.update({k: state[k] for k in MLP_AND_NORMS})
        if self.cfg.engine:
            self.note_dropped_biases(state)
            for k in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):  # the layer's writes to the residual
                out[k] = out[k].double() * self.resid_scale
        return {k: v.to(self.dtype) for k, v in out.items()}, channels

    def note_dropped_biases(self, state: dict) -> None:
        for name in ("q_proj.bias", "kv_a_proj.bias", "o_proj.bias"):
            t = state.get("self_attn." + name)
            if t is not None:
                self.dropped[name] = max(self.dropped.get(name, 0.0), float(t.abs().max()))

    # -- the run -------------------------------------------------------------------------------------
    def verification_ids(self) -> torch.Tensor | None:
        n = self.cfg.verify_tokens
        if n == 0:
            return None
        try:
            from ..data import builtin_texts
            from ..sources import load_tokenizer

            tok = load_tokenizer(str(self.src))
            ids = tok("\n\n".join(builtin_texts("builtin-eval")[:40]), add_special_tokens=False)["input_ids"][:n]
            if len(ids) == n:
                return torch.tensor([ids])
        except Exception as e:  # no usable tokenizer: random tokens still measure the maths
            self.notes.append(f"verification used random token ids (tokenizer unavailable: {type(e).__name__})")
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, self.native.vocab_size, (1, n), generator=gen)

    def run(self) -> ExportReport:
        t0 = time.time()
        c = self.native
        ids = self.verification_ids()
        embed = self.weights.get("model.embed_tokens.weight")
        check = StreamCheck(c, self.ds_config, ids, embed, self.resid_scale) if ids is not None else None
        channels: list[dict] = []
        with atomic_dir(Path(self.cfg.output), self.cfg.overwrite) as tmp:
            writer = ShardWriter(tmp)
            for i in range(c.num_hidden_layers):
                state = self.native_layer(i)
                ds_state, ch = self.layer_tensors(i, state)
                channels.append({k: v.as_dict() for k, v in ch.items()})
                if check is not None:
                    check.layer(i, state, ds_state)
                for k, v in ds_state.items():
                    writer.add(f"model.layers.{i}.{k}", v)
            fidelity = self.write_rest(writer, tmp, check, embed)
            writer.close()
            report = self.report(channels, fidelity, time.time() - t0)
            (tmp / "export.json").write_text(json.dumps(self.record(report, channels), indent=2))
            (tmp / "README.md").write_text(model_card(report))
        return report

    def write_rest(self, writer: ShardWriter, tmp: Path, check: StreamCheck | None, embed) -> dict | None:
        w = self.weights
        head = w.get("lm_head.weight") if w.has("lm_head.weight") else embed
        norm = w.get("model.norm.weight")
        # Engine form: the head reads the final norm's output, so 1/s on the norm and s on the head keep the
        # logits; a tied head then stays equal to the (scaled) embeddings (llama.cpp can share one tensor).
        s = self.resid_scale
        ds_embed, ds_norm, ds_head = ((embed.double() * s).to(self.dtype), (norm.double() / s).to(self.dtype),
                                      (head.double() * s).to(self.dtype))
        writer.add("model.embed_tokens.weight", ds_embed)
        writer.add("model.norm.weight", ds_norm)
        writer.add("lm_head.weight", ds_head.clone())  # explicit (and unshared) even when tied
        self.ds_config.save_pretrained(str(tmp))
        copied = [name for name in TOKENIZER_FILES if (self.src / name).is_file()]
        for name in copied:
            shutil.copy2(self.src / name, tmp / name)
        if "tokenizer_config.json" not in copied and "tokenizer.json" not in copied:
            self.notes.append("no tokenizer files in the native checkpoint; none copied")
        if check is None:
            return None
        return check.finish(norm, head, ds_norm, ds_head)

    # -- records ---------------------------------------------------------------------------------------
    def cache_breakdown(self) -> dict:
        c, n_layers = self.native, self.native.num_hidden_layers
        extra = 0 if self.cfg.engine else 1
        latent = sum(c.kv_lora_ranks)
        rope_native = sum(2 * len(f) for f in c.rope_freq_idx)
        return {
            "latent": latent,
            "rope": rope_native,
            "constant_channel": extra * n_layers,
            "rank_padding": sum(self.rank - extra - r for r in c.kv_lora_ranks),
            "rope_padding": n_layers * self.table.dim - rope_native,
        }

    def report(self, channels: list[dict], fidelity: dict | None, seconds: float) -> ExportReport:
        c = self.native
        breakdown = self.cache_breakdown()
        native_total = sum(c.cache_values_per_token())
        export_total = c.num_hidden_layers * (self.rank + self.table.dim)
        delta = max((ch["delta_bound"] for layer in channels for ch in layer.values()), default=0.0)
        engine = self.cfg.engine and self.table.engine_ok and self.cfg.rope_interleave
        dropped = {k: v for k, v in self.dropped.items() if v > 0}
        if dropped:
            hint = (" the native model has no source biases: re-convert with --no-centre for an exact engine form"
                    if not self.native.attention_bias and self.dropped.get("kv_a_proj.bias", 0) > 0 else
                    " (source biases such as Qwen2's q/k/v: heal this form before serving)")
            self.notes.append(f"engine form leaves out nonzero native biases {sorted(dropped)};" + hint)
        if not self.cfg.engine:
            self.notes.append(
                "vLLM builds DeepSeek attention without biases and skips bias tensors when loading (SGLang's "
                "projections are bias-free too): this exact export is for transformers; engines would silently "
                "compute another function (export with --engine for engines)"
            )
        return ExportReport(
            output=self.cfg.output, source=str(self.src), layers=c.num_hidden_layers, kv_lora_rank=self.rank,
            qk_rope_head_dim=self.table.dim, qk_nope_head_dim=c.head_dim, q_lora_rank=self.geometry.q_lora_rank,
            rope_parameters=dict(self.table.rope_parameters), rope_interleave=self.cfg.rope_interleave,
            attention_bias=not self.cfg.engine, cache_values_native=native_total, cache_values_export=export_total,
            cache_breakdown=breakdown, exact=not dropped, delta_bound=delta, engine_compatible=engine,
            fidelity=fidelity, fidelity_note=fidelity_note(self, delta, fidelity, dropped), notes=self.notes,
            dropped_biases=dropped, residual_scale=self.resid_scale, seconds=round(seconds, 1),
        )

    def record(self, report: ExportReport, channels: list[dict]) -> dict:
        return {
            "mla_retrofit_version": __version__,
            "source": str(self.src),
            "source_model": self.native.source_model,
            "settings": self.cfg.as_dict(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "report": asdict(report),
            "rope": {"step": self.table.step, "slots": self.table.slots,
                     "theta": self.table.rope_parameters.get("rope_theta"),
                     "max_freq_rel_error": self.table.max_freq_rel_error, "engine_ok": self.table.engine_ok},
            "folding": {"alpha": self.geometry.alpha, "alpha_rope": self.geometry.alpha_rope},
            "constant_channels": channels,
        }


def fidelity_note(exp: DeepseekExporter, delta: float, fidelity: dict | None, dropped: dict) -> str:
    measured = (
        f" Measured against the native model in float32 over {fidelity['tokens']} tokens: KL per token mean "
        f"{fidelity['kl_mean']:.2e}, max {fidelity['kl_max']:.2e}, top-1 agreement {fidelity['top1_agreement']:.3f}."
        if fidelity else " Not measured (verify_tokens=0)."
    )
    rope = f"RoPE table matches the kept frequencies to {exp.table.max_freq_rel_error:.1e} (relative)."
    if not exp.cfg.engine:
        return (
            "Exact re-parameterisation (transformers): a constant latent channel makes kv_a_layernorm a fixed rescale "
            f"up to a worst-case relative shrink of {delta:.1e} per token (1 cache value per layer); the softmax scale "
            f"and RoPE factors are folded into the query weights. {rope}" + measured
        )
    form = (
        "Engine form (no biases; what vLLM, SGLang and llama.cpp run): kv_a_layernorm runs in its linear regime (latent "
        f"rows scaled down, worst-case relative shrink {delta:.1e}), every RMSNorm uses eps 1e-6 with the residual "
        f"stream scaled by {exp.resid_scale:.6g} to keep the source's norms. "
    )
    if dropped:
        return form + f"Approximate: nonzero native biases left out ({', '.join(sorted(dropped))}). {rope}" + measured
    return form + f"Exact: the native model has no attention biases. {rope}" + measured


def model_card(r: ExportReport) -> str:
    fid = (f"- measured KL per token vs native (float32, {r.fidelity['tokens']} tokens): mean {r.fidelity['kl_mean']:.2e}, "
           f"max {r.fidelity['kl_max']:.2e}\n") if r.fidelity else ""
    return (
        f"# DeepSeek-V3 export of {r.source}\n\n"
        f"Written by mla-retrofit {__version__}. Loads with stock transformers "
        "(`DeepseekV3ForCausalLM.from_pretrained(path)`, no remote code).\n\n"
        f"- kv_lora_rank {r.kv_lora_rank}, qk_rope_head_dim {r.qk_rope_head_dim}, qk_nope_head_dim {r.qk_nope_head_dim}, "
        f"q_lora_rank {r.q_lora_rank}, attention_bias {r.attention_bias}, rope_interleave {r.rope_interleave}\n"
        f"- KV cache per token: {r.cache_values_export} values (native {r.cache_values_native}); "
        f"breakdown {r.cache_breakdown}\n"
        f"{fid}"
        f"- fidelity: {r.fidelity_note}\n"
        f"- vLLM/SGLang compatible (from their source, not run): {r.engine_compatible}\n\n"
        + "".join(f"- note: {n}\n" for n in r.notes)
        + "\n`export.json` holds the settings, the RoPE table and the per-layer constant channels.\n"
    )


def export_deepseek(
    model_dir: str,
    out_dir: str,
    pad_ranks: bool = False,
    flashmla: bool = False,
    overwrite: bool = False,
    *,
    pad_rope: bool = False,
    biases: bool = True,
    engine: bool = False,
    rope_interleave: bool = True,
    dtype: str = "auto",
    verify_tokens: int = 64,
    yarn_rope: bool = True,
) -> ExportReport:
    """Write ``out_dir`` as a stock-transformers ``DeepseekV3ForCausalLM`` checkpoint of the native model in ``model_dir``."""
    cfg = ExportConfig(
        model=str(model_dir), output=str(out_dir), pad_ranks=pad_ranks, flashmla=flashmla, pad_rope=pad_rope,
        biases=biases, engine=engine, rope_interleave=rope_interleave, dtype=dtype, verify_tokens=verify_tokens, overwrite=overwrite,
        yarn_rope=yarn_rope,
    )
    return DeepseekExporter(cfg).run()

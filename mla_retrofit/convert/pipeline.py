"""The streamed GQA -> MLA conversion: calibrate, plan, allocate, factorize and write, one layer at a time.

Pass A runs the calibration batch through the source model layer by layer
(one layer's weights in memory), collects each layer's statistics, decides its
RoPE pairs, and saves both to the partial run on disk (:mod:`.partial`). The
global latent budget is then spread over the layers from their spectra. Pass B
reads each layer's statistics back, factorizes and writes it; with
``propagate="converted"`` it re-runs the calibration batch through the
already-converted layers so later layers are fitted to what they will see.
The output is assembled from the converted layers' files and moved into place
when complete; a killed run resumes from its last finished layer.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, architectures, data, dtypes, faults
from ..checkpoint import AUTO_MAP, ShardWriter, atomic_dir, check_output, clean_stale, write_modeling_code
from ..errors import UserError
from ..modeling.configuration_mla import MLARetrofitConfig
from ..modeling.modeling_mla import MLARetrofitDecoderLayer, MLARetrofitRotaryEmbedding
from ..sources import Source, resolve
from . import allocate, factorize
from .calibrate import LayerStats, accumulate
from .config import ConvertConfig, calib_parts
from .layer import (ALPHAS, AttnWeights, attention_state, drop_zero_biases, factorization, keep_freqs, metric,
                    plan_rope, refit_values, targets)
from .output_refit import refit_output
from .partial import RESUME_FREE, PartialRun, source_fingerprint
from .report import ConversionResult, LayerReport, conversion_record, model_card, peak_rss_mb

__all__ = ["ConvertConfig", "Converter", "ConversionResult", "LayerReport", "convert"]


class Converter:
    """Runs one conversion; ``progress(stage, i, n)`` is called as layers finish."""

    def __init__(self, cfg: ConvertConfig, progress: Callable[[str, int, int], None] | None = None, source: Source | None = None):
        cfg.validate()
        self.cfg = cfg
        self.progress = progress or (lambda *a: None)
        self.source = source or resolve(cfg.model)
        self.config = self.source.config
        self.spec = architectures.spec_for(self.config)
        self.config._attn_implementation = "sdpa"
        c = self.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = architectures.head_dim(c)
        self.n_layers = c.num_hidden_layers
        self.normed = self.spec.qk_norm
        self.sliding = architectures.sliding_window(c)
        self.budget = allocate.resolve_budget(self.n_kv, self.head_dim, cfg.kv_ratio, cfg.kv_dim, cfg.rank, cfg.rope_dim)
        if cfg.rope_layout == "deepseek":
            half, pairs = self.head_dim // 2, self.budget.rope_dim // 2
            if pairs == 0 or pairs > half:
                raise UserError(f"--rope-layout deepseek needs --rope-dim between 2 and head_dim = {2 * half}, "
                                f"got {2 * pairs}")
        self.rotary = self.spec.rotary_class()(config=c)
        self.dtype = self._out_dtype()
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            if not self.source.weights.has(name):
                raise UserError(f"{cfg.model} has no '{name}' tensor; it is not a complete causal-LM checkpoint")
        if not getattr(c, "tie_word_embeddings", False) and not self.source.weights.has("lm_head.weight"):
            raise UserError(f"{cfg.model} has untied embeddings (tie_word_embeddings is false) but no 'lm_head.weight'; "
                            "add the output head's weights, or set tie_word_embeddings to true in its config.json")

    # -- small helpers ---------------------------------------------------------------------------
    def _out_dtype(self) -> torch.dtype:
        if self.cfg.dtype != "auto":
            return dtypes.weight_dtype(self.cfg.dtype)
        any_name = self.spec.layer_prefix.format(i=0) + "self_attn.q_proj.weight"
        t = self.source.weights.get(any_name)
        return t.dtype if t.is_floating_point() else torch.float32

    def _layer(self, i: int):
        layer = self.spec.layer_class()(self.config, i)
        prefix = self.spec.layer_prefix.format(i=i)
        state = {k: self.source.weights.get(prefix + k).float() for k in layer.state_dict()}
        layer.load_state_dict(state)
        return layer.float().eval()

    def _windows(self, work: PartialRun | None = None) -> torch.Tensor:
        """The calibration windows: ``calib_samples`` x ``calib_seq_len`` tokens. A mixture (``A+B``) takes an
        equal share of windows from each part and interleaves them, so any first few windows hold every part."""
        cfg = self.cfg
        tok = self.source.tokenizer()
        parts = calib_parts(cfg.calib)
        shares = [cfg.calib_samples // len(parts) + (i < cfg.calib_samples % len(parts)) for i in range(len(parts))]
        got = []
        for spec, share in zip(parts, shares):
            if spec == data.TEACHER_SAMPLES:
                from .teacher import calibration_texts

                report = lambda done, total: self.progress("samples", done, total)  # noqa: E731
                texts = calibration_texts(cfg.model, tok, share, cfg.calib_seq_len, cfg.calib_seed,
                                          work and work.teacher_samples, report)
            else:
                texts = data.texts(spec, tok)
            got.append(data.token_windows(texts, tok, share, cfg.calib_seq_len, seed=cfg.calib_seed))
        order = [w for j in range(max(len(g) for g in got)) for w in (g[j] for g in got if j < len(g))]
        ids = torch.stack(order)
        if ids.shape[0] < cfg.calib_samples:
            self.notes.append(f"calibration data gave {ids.shape[0]} windows of {cfg.calib_seq_len} tokens, not {cfg.calib_samples}")
        return ids

    def _rope(self, t: int):
        x = torch.zeros(1, t, 1)
        pos = torch.arange(t).unsqueeze(0)
        return self.rotary(x, pos)

    def mla_config(self, ranks: list[int], freq_idx: list[list[int]]) -> MLARetrofitConfig:
        c = self.config
        return MLARetrofitConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=len(ranks), num_attention_heads=self.n_heads, kv_groups=self.n_kv,
            num_key_value_heads=self.n_kv, head_dim=self.head_dim, hidden_act=c.hidden_act,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(c.rope_parameters), attention_bias=self.source_has_bias("q_proj"),
            # centring gives the latent and the output projection biases; without it only source biases remain
            kv_a_bias=self.cfg.centre or self.source_has_bias("k_proj") or self.source_has_bias("v_proj"),
            o_bias=self.cfg.centre or self.source_has_bias("o_proj"), mlp_bias=getattr(c, "mlp_bias", False), qk_norm=self.normed,
            latent_input="normed_keys" if self.normed else "hidden", kv_lora_ranks=ranks, rope_freq_idx=freq_idx,
            sliding_window=self.sliding, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
            source_model=self.cfg.model, source_model_type=c.model_type,
        )

    def source_has_bias(self, proj: str) -> bool:
        return self.source.weights.has(self.spec.layer_prefix.format(i=0) + f"self_attn.{proj}.bias")

    # -- pass A: statistics and RoPE plans --------------------------------------------------------
    def _run_layer(self, layer, hidden: torch.Tensor, cos, sin, stats: LayerStats | None,
                   post_attention: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``layer`` over the calibration batch (collecting ``stats`` on its attention inputs); returns outputs.

        ``post_attention``, if given, is filled with the residual stream right after the attention (``h + attn``).
        """
        out = torch.empty_like(hidden)
        attn = layer.self_attn
        captured = {}

        def hook(_mod, args, kwargs):
            captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

        def out_hook(_mod, _args, _kwargs, output):
            captured["a"] = output[0]

        handles = []
        if stats is not None:  # the attention's input and its q/k/v projections, which the statistics read
            handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
            for name in ("q_proj", "k_proj", "v_proj"):
                handles.append(getattr(attn, name).register_forward_hook(
                    lambda _m, _a, out, name=name: captured.__setitem__(name, out)))
        if post_attention is not None:
            handles.append(attn.register_forward_hook(out_hook, with_kwargs=True))
        try:
            bs = self.cfg.batch_size
            with torch.no_grad():
                for s in range(0, hidden.shape[0], bs):
                    h = hidden[s : s + bs]
                    c, sn = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
                    out[s : s + bs] = layer(h, attention_mask=None, position_embeddings=(c, sn),
                                            position_ids=torch.arange(h.shape[1]).unsqueeze(0))
                    if post_attention is not None:
                        post_attention[s : s + bs] = h + captured["a"]
                    if stats is not None:
                        accumulate(stats, attn, captured["x"], c, sn, self.n_heads,
                                   self.cfg.eval_samples, self.cfg.eval_seq_len, self.sliding,
                                   self.cfg.att_samples if self.cfg.value_fit == "attention" and self.cfg.method == "mla" else 0,
                                   linear=(captured["q_proj"], captured["k_proj"], captured["v_proj"]))
        finally:
            for hd in handles:
                hd.remove()
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the calibration tokens (only their rows become float32, not the whole table)."""
        return self.source.weights.get("model.embed_tokens.weight")[ids].float()

    def fingerprint(self) -> dict:
        cfg = {k: v for k, v in self.cfg.as_dict().items() if k not in RESUME_FREE}
        return {"config": cfg, "mla_retrofit_version": __version__, "source_files": source_fingerprint(self.source)}

    def run(self) -> ConversionResult:
        t0 = time.time()
        self.notes: list[str] = []
        cfg = self.cfg
        out_dir = Path(cfg.output)
        clean_stale(out_dir)  # first, so a run killed inside the output swap gets its old output back
        check_output(out_dir, cfg.overwrite)
        work = PartialRun(out_dir, self.fingerprint(), self.n_layers, resume=cfg.resume,
                          discard=cfg.overwrite and not cfg.resume)
        self.notes += work.notes
        ids = self._windows(work)
        cos, sin = self._rope(ids.shape[1])
        inv_freq = self.rotary.inv_freq.double()
        scaling = float(getattr(self.rotary, "attention_scaling", 1.0))

        # (at full budget the construction is exact: a refit could only add the solve's rounding)
        refit = cfg.refit_output and cfg.method == "mla" and self.budget.per_layer < self.budget.full
        # Pass A: statistics, RoPE plan and spectrum per layer, each saved as soon as it is done
        start, hidden = work.resume_a()
        if start < self.n_layers:
            hidden = self._embed(ids) if hidden is None else hidden
        self.progress("calibrate", start, self.n_layers)
        kept: dict[int, tuple] = {}  # layer -> (spectrum, kept frequencies): all allocation needs
        for i in range(start, self.n_layers):
            layer = self._layer(i)
            stats = LayerStats(self.n_kv, self.head_dim)
            target = torch.empty_like(hidden) if refit else None
            hidden = self._run_layer(layer, hidden, cos, sin, stats, target)
            plan = plan_rope(stats, cfg.method, self.budget.rope_dim, inv_freq, self.n_heads, scaling, cfg.rope_layout,
                             cfg.nope_fit, cfg.rope_mixing)
            tg = targets(stats, plan)
            g = metric(stats, plan, tg, AttnWeights.of(layer.self_attn), self.n_heads, 1.0) if cfg.method == "mla" else None
            stats.samples.clear()
            spectrum = factorize.weighted_spectrum(tg.cov, g)[0]
            work.save_a(i, stats, plan, spectrum, hidden, target)
            kept[i] = (spectrum, [t for _, t in plan.kept])
            del layer, stats, tg, g, target
            self.progress("calibrate", i + 1, self.n_layers)
        del hidden
        for i in range(start):  # layers a killed run calibrated: read back from its files
            saved = work.load_a(i)
            kept[i] = (saved["spectrum"], [t for _, t in saved["plan"].kept])
            del saved
        spectra, freq_idx = [kept[i][0] for i in range(self.n_layers)], [kept[i][1] for i in range(self.n_layers)]
        self.sensitivity = None
        b = self.budget
        if (cfg.rank_allocation == "sensitivity" and cfg.method == "mla" and b.uniform_rank is None
                and b.latent_total_per_layer < b.full - b.rope_dim):  # (at full budget every layer gets full rank)
            from .sensitivity import layer_sensitivities

            self.sensitivity = layer_sensitivities(self, ids[: cfg.sensitivity_samples], seed=cfg.calib_seed)
        ranks = self._allocate(spectra)
        mla_cfg = self.mla_config(ranks, freq_idx)
        mla_cfg._attn_implementation = "sdpa"

        # Pass B: factorize and write each layer to the partial directory
        converted = cfg.propagate == "converted"
        track = converted or refit  # pass B carries the converted model's hidden states through the layers
        start, hidden = work.resume_b(track)
        if track and start < self.n_layers and hidden is None:
            hidden = self._embed(ids)
        self.progress("convert", start, self.n_layers)
        for i in range(start, self.n_layers):
            if not track and work.b_path(i).is_file():
                self.progress("convert", i + 1, self.n_layers)
                continue
            layer = self._layer(i)
            saved = work.load_a(i)
            stats, plan = saved["stats"], saved["plan"]
            if converted and i > 0:
                stats = LayerStats(self.n_kv, self.head_dim)
                self._run_layer(layer, hidden, cos, sin, stats)
                plan = plan_rope(stats, cfg.method, self.budget.rope_dim, inv_freq, self.n_heads, scaling, cfg.rope_layout,
                             cfg.nope_fit, cfg.rope_mixing)
                plan = keep_freqs(plan, saved["plan"])
            mla_layer, report = self._convert_layer(i, layer, stats, plan, ranks[i], mla_cfg, cos, sin)
            target = saved.get("target")
            del saved, stats
            if refit:
                hidden, report.output_error, report.output_error_refit = refit_output(
                    mla_layer, hidden, target, cos, sin, self.cfg.batch_size, self.cfg.refit_ridge)
            elif track:
                hidden = self._run_layer(mla_layer, hidden, cos, sin, None)
            del target
            work.save_b(i, {f"model.layers.{i}.{k}": v.to(self.dtype) for k, v in mla_layer.state_dict().items()}, asdict(report),
                        hidden if track else None)
            del layer, mla_layer
            self.progress("convert", i + 1, self.n_layers)

        # Assembly. A small model gets one file: the layers are streamed into it. A model larger than one
        # shard keeps each converted layer's file as its shard, hard-linked into the output (no copy, no
        # second copy on disk; the partial run stays intact until the output is in place).
        result = ConversionResult(output=cfg.output)
        layer_files = [work.load_b(i) for i in range(self.n_layers)]
        result.layers = [LayerReport(**json.loads(f.metadata["report"])) for f in layer_files]
        for r in result.layers:
            r.predicted_error = allocate.predicted_tail(spectra[r.layer], r.rank)
            if self.sensitivity is not None:
                r.sensitivity = self.sensitivity[r.layer]
                r.predicted_kl, r.measured_kl = r.sensitivity * r.predicted_error, r.sensitivity * r.attn_error
        with atomic_dir(out_dir, cfg.overwrite) as tmp:
            writer = ShardWriter(tmp)
            one_file = sum(work.b_path(i).stat().st_size for i in range(self.n_layers)) + self._rest_bytes() \
                <= writer.max_bytes
            for i, f in enumerate(layer_files):
                if one_file:
                    for name in f.keys():
                        e = f.entries[name]
                        writer.add_raw(name, e["dtype"], e["shape"], f.raw(name))
                else:
                    writer.adopt(work.b_path(i), f)
                f.close()
            self._write_rest(writer, tmp, mla_cfg)
            if work.teacher_samples.is_file():  # the calibration text, for a rerun or a heal (--data)
                (tmp / "data").mkdir()
                shutil.copyfile(work.teacher_samples, tmp / "data" / "teacher-samples.jsonl")
            writer.close()
            result.kv_original = self.n_layers * self.budget.full
            result.kv_converted = sum(mla_cfg.cache_values_per_token())
            result.seconds = time.time() - t0
            result.peak_rss_mb = peak_rss_mb()
            (tmp / "conversion.json").write_text(json.dumps(conversion_record(self, result, mla_cfg), indent=2))
            (tmp / "README.md").write_text(model_card(self, result))
        work.remove()
        return result

    def _allocate(self, spectra: list[torch.Tensor]) -> list[int]:
        b = self.budget
        r_max = [b.full - b.rope_dim] * self.n_layers
        if b.uniform_rank is not None:
            return [b.uniform_rank] * self.n_layers
        per = b.latent_total_per_layer
        if self.cfg.rank_allocation == "uniform" or self.cfg.method != "mla" or per >= r_max[0]:
            return [min(per, r_max[0])] * self.n_layers
        r_min = [max(1, int(math.ceil(self.cfg.min_rank_fraction * per)))] * self.n_layers
        weights = None if self.sensitivity is None else [s ** self.cfg.sensitivity_power for s in self.sensitivity]
        return allocate.adaptive_ranks(spectra, per * self.n_layers, r_min, r_max, weights=weights)

    def _convert_layer(self, i, layer, stats, plan, rank, mla_cfg, cos, sin):
        w = AttnWeights.of(layer.self_attn)
        tg = targets(stats, plan)
        x = torch.stack(stats.x_eval)  # [S, T, d]
        t = x.shape[1]
        c, sn = cos[:, :t].expand(x.shape[0], -1, -1), sin[:, :t].expand(x.shape[0], -1, -1)
        with torch.no_grad():
            ref = layer.self_attn(hidden_states=x, position_embeddings=(c, sn), attention_mask=None)[0]
        mla_layer = MLARetrofitDecoderLayer(mla_cfg, i).eval()
        mla_cos, mla_sin = MLARetrofitRotaryEmbedding(mla_cfg)(x, torch.arange(t).unsqueeze(0))
        best = None
        alphas = ALPHAS if (self.cfg.method == "mla" and tg.n_k and rank < tg.cov.shape[0]) else (None,)
        centred = self.cfg.method == "mla" and self.cfg.centre
        mu_u = stats.mean() if centred else torch.zeros_like(stats.mean())
        pos = (mla_cos.expand(x.shape[0], -1, -1), mla_sin.expand(x.shape[0], -1, -1))
        for alpha in alphas:
            g = metric(stats, plan, tg, w, self.n_heads, alpha if alpha is not None else 1.0) if self.cfg.method == "mla" else None
            fact = factorization(self.cfg.method, stats, tg, w, rank, g, self.cfg.centre)
            candidates = [(fact, "token")]
            refit = refit_values(fact, tg, stats, centre=mu_u) if self.cfg.method == "mla" else None
            if refit is not None:
                candidates.append((refit, "attention"))
            for cand, value_fit in candidates:
                state = attention_state(w, plan, tg, cand, mu_u, self.n_heads, self.head_dim, self.normed)
                state = drop_zero_biases(state, mla_layer.self_attn.state_dict().keys())
                mla_layer.self_attn.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
                with torch.no_grad():
                    out = mla_layer.self_attn(x, position_embeddings=pos)[0]
                err = float((out - ref).square().sum() / ref.square().sum().clamp_min(1e-30))
                if best is None or err < best[0]:
                    best = (err, alpha, cand, state, value_fit)
        err, alpha, fact, state, value_fit = best
        mla_layer.self_attn.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            getattr(mla_layer, name).load_state_dict(getattr(layer, name).state_dict(), strict=True)
        n_k = tg.n_k
        report = LayerReport(
            layer=i, rank=rank, rope_dim=2 * len(plan.kept), kept_pairs=[list(p) for p in plan.kept],
            retained_energy=fact.retained(),
            key_error=factorize.relative_error(tg.cov, fact, slice(0, n_k)) if n_k else 0.0,
            value_error=factorize.relative_error(tg.cov, fact, slice(n_k, None)),
            attn_error=err, alpha=alpha, rope_cost_kept=plan.info.get("rope_cost_kept"), value_fit=value_fit,
        )
        return mla_layer, report

    def _rest_bytes(self) -> int:
        c, size = self.config, torch.empty(0, dtype=self.dtype).element_size()
        tables = 1 if getattr(c, "tie_word_embeddings", False) else 2
        return (tables * c.vocab_size + 1) * c.hidden_size * size

    def _write_rest(self, writer: ShardWriter, tmp: Path, mla_cfg: MLARetrofitConfig) -> None:
        w = self.source.weights
        writer.add("model.embed_tokens.weight", w.get("model.embed_tokens.weight").to(self.dtype))
        faults.point("convert.rest")
        writer.add("model.norm.weight", w.get("model.norm.weight").to(self.dtype))
        if not mla_cfg.tie_word_embeddings:
            writer.add("lm_head.weight", w.get("lm_head.weight").to(self.dtype))
        mla_cfg.auto_map = dict(AUTO_MAP)
        mla_cfg.dtype = str(self.dtype).replace("torch.", "")
        mla_cfg.save_pretrained(str(tmp))
        write_modeling_code(tmp)
        try:
            self.source.tokenizer().save_pretrained(str(tmp))
        except Exception as e:  # a model without a tokenizer still converts
            self.notes.append(f"tokenizer not copied: {e}")

def convert(cfg: ConvertConfig, progress=None, source: Source | None = None) -> ConversionResult:
    return Converter(cfg, progress, source).run()

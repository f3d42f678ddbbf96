"""The streamed GQA -> MLA conversion: calibrate, plan, allocate, factorize and write, one layer at a time.

Pass A runs the calibration batch through the source model layer by layer
(one layer's weights in memory), accumulates every layer's statistics and
decides its RoPE pairs. The global latent budget is then spread over the
layers. Pass B factorizes and writes each layer; with
``propagate="converted"`` it re-runs the calibration batch through the
already-converted layers so later layers are fitted to what they will see.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, architectures, data
from ..checkpoint import AUTO_MAP, ShardWriter, atomic_dir, write_modeling_code
from ..errors import UserError
from ..modeling.configuration_mla import MLARetrofitConfig
from ..modeling.modeling_mla import MLARetrofitDecoderLayer, MLARetrofitRotaryEmbedding
from ..sources import Source, resolve
from . import allocate, factorize
from .calibrate import LayerStats, accumulate
from .layer import ALPHAS, METHODS, AttnWeights, attention_state, factorization, metric, plan_rope, refit_values, targets


@dataclass
class ConvertConfig:
    model: str
    output: str
    kv_ratio: float | None = 0.5
    kv_dim: int | None = None
    rank: int | None = None
    rope_dim: int | None = None
    method: str = "mla"
    rank_allocation: str = "adaptive"
    min_rank_fraction: float = 0.25
    calib: str = "builtin"
    calib_samples: int = 64
    calib_seq_len: int = 512
    batch_size: int = 8
    propagate: str = "original"
    eval_samples: int = 4
    eval_seq_len: int = 256
    value_fit: str = "attention"
    rope_layout: str = "free"
    centre: bool = True  # False: bias-free latent (no centring), exact in the bias-free engine export
    att_samples: int = 16
    dtype: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.rank_allocation not in ("adaptive", "uniform"):
            raise UserError("--rank-allocation must be 'adaptive' or 'uniform'")
        if self.rope_layout not in ("free", "deepseek"):
            raise UserError("--rope-layout must be 'free' or 'deepseek'")
        if self.value_fit not in ("attention", "token"):
            raise UserError("--value-fit must be 'attention' or 'token'")
        if self.propagate not in ("original", "converted"):
            raise UserError("--propagate must be 'original' or 'converted'")
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise UserError(f"--kv-ratio must be in (0, 1], got {self.kv_ratio}")
        if self.calib_samples < 1 or self.calib_seq_len < 16:
            raise UserError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
        if self.rope_dim is not None and (self.rope_dim < 0 or self.rope_dim % 2):
            raise UserError(f"--rope-dim must be an even number >= 0, got {self.rope_dim}")


@dataclass
class Budget:
    """Per-layer cache values ``r_l + d_R`` and how they were derived."""

    per_layer: int  # cache values per token per layer (mean, for adaptive)
    rope_dim: int
    full: int  # 2 * n_kv * h
    uniform_rank: int | None = None  # explicit --rank

    @property
    def latent_total_per_layer(self) -> int:
        return self.per_layer - self.rope_dim


def resolve_budget(cfg: ConvertConfig, n_kv: int, head_dim: int) -> Budget:
    full = 2 * n_kv * head_dim
    max_rope = n_kv * head_dim
    if cfg.rank is not None:
        rope_dim = cfg.rope_dim if cfg.rope_dim is not None else min(64, head_dim)
        per_layer = cfg.rank + rope_dim
    else:
        per_layer = cfg.kv_dim if cfg.kv_dim is not None else int(round(cfg.kv_ratio * full))
        rope_dim = cfg.rope_dim if cfg.rope_dim is not None else default_rope_dim(per_layer, full, head_dim, max_rope)
    if rope_dim > max_rope:
        raise UserError(f"--rope-dim {rope_dim} exceeds the model's {max_rope} key dims per layer (n_kv * head_dim)")
    r_max = full - rope_dim
    if cfg.rank is not None and cfg.rank > r_max:
        raise UserError(f"--rank {cfg.rank} is above the maximum useful rank {r_max} for --rope-dim {rope_dim}")
    if per_layer > full:
        raise UserError(f"budget of {per_layer} cache values per layer exceeds the original {full}; nothing to save")
    if per_layer <= rope_dim:
        raise UserError(
            f"budget of {per_layer} cache values per layer leaves no room for a latent beside {rope_dim} RoPE dims; "
            "raise --kv-ratio/--kv-dim or lower --rope-dim"
        )
    return Budget(per_layer=per_layer, rope_dim=rope_dim, full=full, uniform_rank=cfg.rank)


def default_rope_dim(per_layer: int, full: int, head_dim: int, max_rope: int) -> int:
    """All key dims at full budget (the exact construction); else min(64, head_dim), at most half the budget."""
    if per_layer >= full:
        return max_rope
    return max(0, min(64, head_dim, 2 * (per_layer // 4)))


@dataclass
class LayerReport:
    layer: int
    rank: int
    rope_dim: int
    kept_pairs: list
    retained_energy: float
    key_error: float
    value_error: float
    attn_error: float
    alpha: float | None = None
    rope_cost_kept: float | None = None
    value_fit: str | None = None


@dataclass
class ConversionResult:
    output: str
    layers: list[LayerReport] = field(default_factory=list)
    kv_original: int = 0
    kv_converted: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def kv_ratio(self) -> float:
        return self.kv_converted / self.kv_original


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
        self.budget = resolve_budget(cfg, self.n_kv, self.head_dim)
        if cfg.rope_layout == "deepseek":
            half, pairs = self.head_dim // 2, self.budget.rope_dim // 2
            if pairs == 0 or pairs > half:
                raise UserError(f"--rope-layout deepseek needs --rope-dim between 2 and head_dim = {2 * half}, "
                                f"got {2 * pairs}")
        self.rotary = self.spec.rotary_class()(config=c)
        self.dtype = self._out_dtype()

    # -- small helpers ---------------------------------------------------------------------------
    def _out_dtype(self) -> torch.dtype:
        if self.cfg.dtype != "auto":
            return getattr(torch, self.cfg.dtype)
        any_name = self.spec.layer_prefix.format(i=0) + "self_attn.q_proj.weight"
        t = self.source.weights.get(any_name)
        return t.dtype if t.is_floating_point() else torch.float32

    def _layer(self, i: int):
        layer = self.spec.layer_class()(self.config, i)
        prefix = self.spec.layer_prefix.format(i=i)
        state = {k: self.source.weights.get(prefix + k).float() for k in layer.state_dict()}
        layer.load_state_dict(state)
        return layer.float().eval()

    def _windows(self) -> torch.Tensor:
        tok = self.source.tokenizer()
        texts = data.texts(self.cfg.calib, tok)
        ids = data.token_windows(texts, tok, self.cfg.calib_samples, self.cfg.calib_seq_len)
        if ids.shape[0] < self.cfg.calib_samples:
            self.notes.append(f"calibration data gave {ids.shape[0]} windows of {self.cfg.calib_seq_len} tokens, not {self.cfg.calib_samples}")
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
    def _run_layer(self, layer, hidden: torch.Tensor, cos, sin, stats: LayerStats | None) -> torch.Tensor:
        """Run ``layer`` over the calibration batch (collecting ``stats`` on its attention inputs); returns outputs."""
        out = torch.empty_like(hidden)
        attn = layer.self_attn
        captured = {}

        def hook(_mod, args, kwargs):
            captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

        handle = attn.register_forward_pre_hook(hook, with_kwargs=True) if stats is not None else None
        try:
            bs = self.cfg.batch_size
            with torch.no_grad():
                for s in range(0, hidden.shape[0], bs):
                    h = hidden[s : s + bs]
                    c, sn = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
                    out[s : s + bs] = layer(h, attention_mask=None, position_embeddings=(c, sn),
                                            position_ids=torch.arange(h.shape[1]).unsqueeze(0))
                    if stats is not None:
                        accumulate(stats, attn, captured["x"], c, sn, self.n_heads,
                                   self.cfg.eval_samples, self.cfg.eval_seq_len, self.sliding,
                                   self.cfg.att_samples if self.cfg.value_fit == "attention" and self.cfg.method == "mla" else 0)
        finally:
            if handle is not None:
                handle.remove()
        return out

    def run(self) -> ConversionResult:
        t0 = time.time()
        self.notes: list[str] = []
        cfg = self.cfg
        ids = self._windows()
        n_tok = ids.shape[1]
        cos, sin = self._rope(n_tok)
        emb = self.source.weights.get("model.embed_tokens.weight").float()
        hidden0 = emb[ids]
        inv_freq = self.rotary.inv_freq.double()
        scaling = float(getattr(self.rotary, "attention_scaling", 1.0))

        # Pass A
        plans, stats_all, spectra = [], [], []
        hidden = hidden0
        for i in range(self.n_layers):
            layer = self._layer(i)
            stats = LayerStats(self.n_kv, self.head_dim)
            hidden = self._run_layer(layer, hidden, cos, sin, stats)
            plan = plan_rope(stats, cfg.method, self.budget.rope_dim, inv_freq, self.n_heads, scaling, cfg.rope_layout)
            tg = targets(stats, plan)
            g = metric(stats, plan, tg, AttnWeights.of(layer.self_attn), self.n_heads, 1.0) if cfg.method == "mla" else None
            spectra.append(factorize.weighted_spectrum(tg.cov, g)[0])
            stats.samples.clear()
            plans.append(plan)
            stats_all.append(stats)
            del layer
            self.progress("calibrate", i + 1, self.n_layers)

        ranks = self._allocate(spectra)

        # Pass B
        result = ConversionResult(output=cfg.output)
        freq_idx = [[t for _, t in p.kept] for p in plans]
        mla_cfg = self.mla_config(ranks, freq_idx)
        mla_cfg._attn_implementation = "sdpa"
        out_dir = Path(cfg.output)
        with atomic_dir(out_dir, cfg.overwrite) as tmp:
            writer = ShardWriter(tmp)
            hidden = hidden0 if cfg.propagate == "converted" else None
            for i in range(self.n_layers):
                layer = self._layer(i)
                stats, plan = stats_all[i], plans[i]
                if cfg.propagate == "converted" and i > 0:
                    stats = LayerStats(self.n_kv, self.head_dim)
                    self._run_layer(layer, hidden, cos, sin, stats)
                    plan = plan_rope(stats, cfg.method, self.budget.rope_dim, inv_freq, self.n_heads, scaling, cfg.rope_layout)
                    plan = _keep_freqs(plan, plans[i])
                mla_layer, report = self._convert_layer(i, layer, stats, plan, ranks[i], mla_cfg, cos, sin)
                stats_all[i] = None
                if cfg.propagate == "converted":
                    hidden = self._run_layer(mla_layer, hidden, cos, sin, None)
                for k, v in mla_layer.state_dict().items():
                    writer.add(f"model.layers.{i}.{k}", v.to(self.dtype))
                result.layers.append(report)
                del layer, mla_layer
                self.progress("convert", i + 1, self.n_layers)
            self._write_rest(writer, tmp, mla_cfg)
            writer.close()
            result.kv_original = self.n_layers * self.budget.full
            result.kv_converted = sum(mla_cfg.cache_values_per_token())
            result.seconds = time.time() - t0
            result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            (tmp / "conversion.json").write_text(json.dumps(self.record(result, mla_cfg), indent=2))
            (tmp / "README.md").write_text(model_card(self, result))
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
        return allocate.adaptive_ranks(spectra, per * self.n_layers, r_min, r_max)

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

    def _write_rest(self, writer: ShardWriter, tmp: Path, mla_cfg: MLARetrofitConfig) -> None:
        w = self.source.weights
        writer.add("model.embed_tokens.weight", w.get("model.embed_tokens.weight").to(self.dtype))
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

    def record(self, result: ConversionResult, mla_cfg: MLARetrofitConfig) -> dict:
        return {
            "mla_retrofit_version": __version__,
            "source_model": self.cfg.model,
            "source_model_type": self.config.model_type,
            "config": asdict(self.cfg),
            "budget": asdict(self.budget),
            "kv_values_per_token": {"original": result.kv_original, "converted": result.kv_converted,
                                    "ratio": result.kv_ratio},
            "cache_values_per_layer": mla_cfg.cache_values_per_token(),
            "layers": [asdict(r) for r in result.layers],
            "seconds": round(result.seconds, 1),
            "peak_rss_mb": round(result.peak_rss_mb, 1),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpus": torch.get_num_threads()},
            "notes": self.notes,
        }


def drop_zero_biases(state: dict, wanted) -> dict:
    """Leave out the bias tensors the MLA layer has no parameter for (they are zero: a bias-free latent)."""
    extra = [k for k in state if k not in wanted]
    for k in extra:
        if not k.endswith(".bias") or float(state[k].abs().max()) > 0:
            raise RuntimeError(f"conversion produced '{k}' but the MLA layer has no such parameter")
    return {k: v for k, v in state.items() if k in wanted}


def _keep_freqs(plan, first_plan):
    """In ``propagate='converted'`` mode the cache layout (kept pairs) stays that of pass A."""
    plan.kept, plan.dropped = first_plan.kept, first_plan.dropped
    return plan


def model_card(conv: Converter, result: ConversionResult) -> str:
    cfg = conv.cfg
    ranks = [r.rank for r in result.layers]
    return (
        f"# MLA retrofit of {cfg.model}\n\n"
        f"Converted with mla-retrofit {__version__} (method `{cfg.method}`, rank allocation `{cfg.rank_allocation}`).\n\n"
        f"- KV cache per token: {result.kv_converted} values vs {result.kv_original} originally "
        f"({result.kv_ratio:.3f}x)\n"
        f"- latent ranks per layer: {ranks}\n"
        f"- RoPE dims per layer: {conv.budget.rope_dim}\n"
        f"- calibration: `{cfg.calib}`, {cfg.calib_samples} x {cfg.calib_seq_len} tokens\n\n"
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.\n"
        "`conversion.json` holds the per-layer report and the exact settings.\n"
    )


def convert(cfg: ConvertConfig, progress=None, source: Source | None = None) -> ConversionResult:
    return Converter(cfg, progress, source).run()

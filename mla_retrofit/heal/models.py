"""The student (converted MLA model), the teacher (original model), and the pieces of them each phase trains.

A student is a native MLA checkpoint (``convert``'s output, remote code) or a
stock ``DeepseekV3ForCausalLM`` (``export --format deepseek``, engine form
included); a heal writes the same format back.

The MLA parameters are exactly the parameters under ``self_attn`` of each
decoder layer. Phase 1 trains them through :class:`AttentionStack`, a module
that holds only the MLA attentions under the student's own parameter names, so
its state dict is a subset of the student's and the full model's forward is
never run. :class:`TeacherTap` records each teacher layer's attention input and
output during one teacher forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..architectures import is_mla
from ..masks import causal_mask  # noqa: F401  (used by the recipe and the tests)
from ..checkpoint import save_mla_model
from ..errors import UserError
from ..modeling.configuration_mla import MLARetrofitConfig
from ..modeling.modeling_mla import MLARetrofitForCausalLM
from ..sources import EMBEDDED_DEFAULT, NO_HUB_KERNELS, embedded_gguf_path, is_hub_id, recorded_source
from ..sources import load_model as load_source_model


def is_attention(name: str) -> bool:
    return ".self_attn." in name


def trains_in_full(name: str) -> bool:
    return not any(part in name for part in FROZEN_IN_FULL)


def set_trainable(module: nn.Module, phase: str) -> list[nn.Parameter]:
    """Freeze everything a phase does not train; returns the trainable parameters in a fixed order."""
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_(trains_in_full(name) if phase == "full" else is_attention(name))
        if p.requires_grad:
            trainable.append(p)
    return trainable


FROZEN_IN_FULL = ("embed_tokens", "lm_head")  # phase 3 keeps the (often tied) embeddings and output head


def _deepseek_classes():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3Config, DeepseekV3ForCausalLM


#: config.json ``model_type`` -> (config class, model class) of the students a heal accepts
STUDENTS = {"mla_retrofit": lambda: (MLARetrofitConfig, MLARetrofitForCausalLM), "deepseek_v3": _deepseek_classes}


def student_type(directory: str) -> str:
    """``mla_retrofit`` or ``deepseek_v3``; a one-line error for anything else."""
    cfg = Path(directory) / "config.json"
    kind = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    if kind not in STUDENTS:
        raise UserError(f"{directory} is neither a converted MLA checkpoint nor a DeepSeek-V3 export; "
                        "run 'mla-retrofit convert' (and optionally 'mla-retrofit export') first")
    return kind


def student_classes(directory: str):
    """(config class, model class) of the student in ``directory``."""
    return STUDENTS[student_type(directory)]()


def load_student(directory: str):
    """The student in float32 (the training master copy), SDPA attention."""
    _, model_cls = student_classes(directory)
    model = model_cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa",
                                      **NO_HUB_KERNELS).train()
    if model.config.model_type == "deepseek_v3":
        scale_latent_rows(model)
    return model


@torch.no_grad()
def scale_latent_rows(model) -> None:
    """Train an engine-form export at its latent's natural scale (an exact reparameterisation).

    The engine form keeps ``kv_a_layernorm`` linear by scaling the latent rows of
    ``kv_a_proj_with_mqa`` down to ~1e-8 (``export.latent_norm``). Adam moves every
    weight by about the learning rate whatever its size, so such rows would be wrecked
    by the first step. ``norm(k c; k^2 eps) = norm(c; eps)`` for any ``k``: the rows are
    multiplied by a power of two ``k`` that brings them to the RoPE rows' size and the
    norm's epsilon by ``k^2``; :func:`save_student` divides ``k`` out again.
    """
    r = model.config.kv_lora_rank
    for layer in model.model.layers:
        attn = layer.self_attn
        w = attn.kv_a_proj_with_mqa.weight
        latent = w[:r].abs().mean()
        ref = (w[r:] if w.shape[0] > r else attn.o_proj.weight).abs().mean()  # the RoPE rows' size
        k = 2.0 ** round(float(torch.log2(ref / latent))) if latent > 0 else 1.0
        k = max(k, 1.0)
        w[:r] *= k
        attn.kv_a_layernorm.variance_epsilon *= k * k
        attn.latent_row_scale = k


def residual_scale(student, teacher) -> float:
    """How much larger the student's residual stream is than the teacher's: 1, or ``s`` for an engine form.

    The engine-form export runs every RMSNorm with eps 1e-6 on a residual stream scaled by
    ``s = sqrt(1e-6 / eps_teacher)`` (``export/deepseek.py``), so the attention inputs (after
    ``input_layernorm``) are the teacher's and the attention outputs are ``s`` times the teacher's.
    """
    return (student.config.rms_norm_eps / teacher.config.rms_norm_eps) ** 0.5


@torch.no_grad()
def teacher_attention(teacher, student, ids: torch.Tensor, positions: torch.Tensor):
    """Every teacher layer's attention input and output for one batch: phase 1's inputs and targets.

    The targets are in the student's residual units (``residual_scale``).
    """
    with TeacherTap(teacher) as tap:
        teacher.model(input_ids=ids, position_ids=positions, use_cache=False)
    scale = residual_scale(student, teacher)
    return [x.detach() for x in tap.inputs], [y.detach() * scale for y in tap.outputs]


def attention_fisher(teacher, ids: torch.Tensor, positions: torch.Tensor, ridge: float, seed: int = 0,
                     progress=None, batch: int = 2) -> list[torch.Tensor]:
    """Per teacher layer, a factor ``L_l`` of the metric phase 1 measures its attention-output error in.

    ``F_l = E[g g^T]`` is the Fisher information of the teacher's next-token distributions with respect
    to layer ``l``'s attention output (``g = d sum_t log p(y_t) / d o_l``, labels ``y`` drawn from the
    teacher itself), so ``1/2 delta^T F_l delta`` is, to second order, the KL an error ``delta`` there
    adds downstream (the same quantity ``convert``'s rank allocation uses, ``convert/sensitivity.py``).
    The metric is ``M_l = (1 - ridge) F_l / mean_eig(F_l) + ridge I`` (``ridge`` 1: plain MSE), returned
    as ``L_l`` with ``L_l L_l^T = M_l`` so that ``|delta L_l|^2 = delta^T M_l delta``. One forward and one
    backward of the teacher per ``batch`` windows of ``ids`` ``[B, T]``.
    """
    layers = list(teacher.model.layers)
    d = teacher.config.hidden_size
    gg = [torch.zeros(d, d, dtype=torch.float64) for _ in layers]
    probes: dict[int, torch.Tensor] = {}

    def probe(i: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            z = torch.zeros_like(out, requires_grad=True)  # d/dz = d/d(attention output), the graph kept whole
            probes[i] = z
            return (out + z, *output[1:]) if isinstance(output, tuple) else out + z

        return hook

    gen = torch.Generator().manual_seed(seed)
    handles = [layer.self_attn.register_forward_hook(probe(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            for b in range(0, ids.shape[0], batch):
                hidden = teacher.model(input_ids=ids[b : b + batch], position_ids=positions[b : b + batch],
                                       use_cache=False).last_hidden_state
                logp = torch.log_softmax(teacher.lm_head(hidden).float(), dim=-1).flatten(0, 1)
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(logp.device)
                logp.gather(-1, y).sum().backward()
                for i, z in probes.items():
                    g = z.grad.reshape(-1, d).double().cpu()
                    gg[i] += g.T @ g
                probes.clear()
                if progress is not None:
                    progress(min(b + batch, ids.shape[0]), ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    eye = torch.eye(d, dtype=torch.float64)
    factors = []
    for f in gg:
        scale = f.trace() / d
        m = (1 - ridge) * f / scale.clamp_min(1e-30) + ridge * eye
        factors.append(torch.linalg.cholesky(m).float())
    return factors


def save_student(model, directory: Path, tokenizer, extra_files: dict[str, str]) -> None:
    """Write the student in its own format (native MLA with its modeling code, or stock DeepSeek-V3)."""
    if is_mla(model.config):
        save_mla_model(model, directory, tokenizer, extra_files)
        return
    state = model.state_dict()  # references; only the rescaled latent projections are copies
    r = model.config.kv_lora_rank
    for i, layer in enumerate(model.model.layers):
        k = getattr(layer.self_attn, "latent_row_scale", 1.0)
        name = f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"
        state[name] = state[name].detach().clone()
        state[name][:r] /= k
    model.save_pretrained(str(directory), state_dict=state, max_shard_size="2GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    for name, text in extra_files.items():
        (directory / name).write_text(text)


def param_counts(directory: str) -> dict[str, int]:
    """``attention`` (MLA), ``full`` (what phase 3 trains) and ``total`` parameter counts, from the config alone."""
    config_cls, model_cls = student_classes(directory)
    with torch.device("meta"):
        model = model_cls(config_cls.from_pretrained(directory))
    named = dict(model.named_parameters())  # tied weights appear once
    return {"attention": sum(p.numel() for n, p in named.items() if is_attention(n)),
            "full": sum(p.numel() for n, p in named.items() if trains_in_full(n)),
            "total": sum(p.numel() for p in named.values())}


def resolve_teacher(model_dir: str, teacher: str | None) -> str:
    """The teacher's name: ``teacher`` or the ``source_model`` recorded in ``conversion.json``; must exist."""
    name = teacher
    if name is None:
        name = recorded_source(model_dir)
        if not name:
            raise UserError(f"{model_dir}/conversion.json names no source model; pass --teacher ORIGINAL_MODEL")
    if name in (EMBEDDED_DEFAULT, "default"):
        embedded_gguf_path()
        return name
    if not Path(name).expanduser().exists() and not is_hub_id(name):
        raise UserError(f"teacher model '{name}' not found; pass --teacher with the original model's directory or .gguf")
    return name


def load_teacher(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = load_source_model(name, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _Slot(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.self_attn = attn


class AttentionStack(nn.Module):
    """The student's MLA attentions, named ``model.layers.{i}.self_attn`` like in the student."""

    _no_split_modules = ["MLARetrofitAttention"]  # the FSDP wrapping unit under accelerate

    def __init__(self, student: MLARetrofitForCausalLM, checkpointing: bool = False):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Slot(layer.self_attn) for layer in student.model.layers)
        self.checkpointing = checkpointing

    def forward(self, inputs: list[torch.Tensor], position_embeddings, attention_mask=None) -> list[torch.Tensor]:
        outputs = []
        for slot, x in zip(self.model.layers, inputs):
            if self.checkpointing and self.training:
                y = checkpoint(_attend, slot.self_attn, x, position_embeddings, attention_mask, use_reentrant=False)
            else:
                y = _attend(slot.self_attn, x, position_embeddings, attention_mask)
            outputs.append(y)
        return outputs


def _attend(attn: nn.Module, x: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
    return attn(x, position_embeddings=position_embeddings, attention_mask=attention_mask)[0]


class TeacherTap:
    """Hooks on every teacher attention: its input (the ``input_layernorm`` output) and its output."""

    def __init__(self, teacher: nn.Module):
        self.layers = list(teacher.model.layers)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = []

    def _hook(self, i: int):
        def hook(_module, args, kwargs, output):
            self.inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def __enter__(self) -> TeacherTap:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class HiddenTap:
    """Records the ``last_hidden_state`` a decoder stack (``model.model``) outputs during a forward."""

    def __init__(self, module: nn.Module):
        self.module, self.hidden, self.handle = module, None, None

    def _hook(self, _module, _args, output):
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __enter__(self) -> HiddenTap:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class LayerTap:
    """Records every decoder layer's output hidden state (the residual stream) during a forward.

    Hooks ``module.layers`` (the decoder stack of any family, the DeepSeek-V3 form included), so it works
    through DDP/FSDP wrappers; ``states[l]`` is layer ``l``'s output, in the autograd graph when training.
    """

    def __init__(self, module: nn.Module):
        self.layers = list(module.layers)
        self.states: list[torch.Tensor] = []
        self.handles: list = []

    def _hook(self, _module, _args, output):
        self.states.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> LayerTap:
        self.states = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

"""The engine form (no biases, linear latent norm, eps 1e-6) and the GGUF that llama.cpp's deepseek2 loads.

Exactness is checked against the native model; the GGUF is read back with the
``gguf`` library and checked against what llama.cpp's ``deepseek2`` loader
requires (the lists below are taken from ``src/models/deepseek2.cpp`` and the
shared hparam loader of the pinned llama.cpp, see ``export/gguf.py``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mla_retrofit.errors import UserError
from mla_retrofit.export import export_deepseek, export_gguf
from mla_retrofit.export.latent_norm import DS_NORM_EPS, apply_norm, latent_bound, linear_norm
from tiny import tiny_tokenizer

ENGINE = dict(engine=True)  # convert --engine: rope_layout="deepseek", rank_allocation="uniform", centre=False
KL_EXACT = 1e-9  # float32 streamed comparison of an exact re-parameterisation (measured ~1e-12)

# deepseek2 metadata the loader reads without a default (arch prefix omitted)
REQUIRED_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.layer_norm_rms_epsilon", "attention.q_lora_rank", "attention.kv_lora_rank",
    "attention.key_length_mla", "attention.value_length_mla", "expert_feed_forward_length", "expert_shared_count",
    "rope.dimension_count",
)


def test_linear_norm_is_linear_within_its_bound():
    torch.manual_seed(0)
    d, r, n = 32, 11, 16
    w_c, g = torch.randn(r, d, dtype=torch.float64), torch.rand(d) + 0.5
    ln = linear_norm(latent_bound(w_c, None, g), n=n)
    assert math.log2(ln.w).is_integer() and ln.delta_bound <= 1e-6
    assert ln.lam * ln.w == pytest.approx(math.sqrt(DS_NORM_EPS), rel=1e-12)
    x_hat = torch.randn(300, d, dtype=torch.float64)
    x = x_hat / x_hat.norm(dim=-1, keepdim=True) * math.sqrt(d) * g.double()  # RMSNorm outputs
    c = x @ w_c.T
    latent = torch.zeros(300, n, dtype=torch.float64)
    latent[:, :r] = ln.lam * c
    out = apply_norm(latent, torch.full((n,), ln.w, dtype=torch.float64))[:, :r]
    rel = ((out - c).norm(dim=-1) / c.norm(dim=-1)).max()
    assert rel <= ln.delta_bound * 1.01
    assert rel > 0  # it is a bound on a real (tiny) shrink, not an identity


def test_no_centre_conversion_has_no_latent_or_output_bias(converted):
    from mla_retrofit.sources import load_model

    state = load_model(str(converted("llama", 0.5, **ENGINE))).state_dict()
    assert not [k for k in state if k.endswith(".bias")]
    qwen2 = load_model(str(converted("qwen2", 0.5, **ENGINE))).state_dict()
    assert "model.layers.0.self_attn.kv_a_proj.bias" in qwen2  # Qwen2's own k/v biases stay
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2  # no centring, no value mean


def test_no_centre_is_lossless_at_full_rank(converted, tiny_src):
    from mla_retrofit.sources import load_model

    ids = tiny_tokenizer()("The json module parses a file. " * 4, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = load_model(str(tiny_src("llama"))).float()(ids).logits.double().log_softmax(-1)
        got = load_model(str(converted("llama", 1.0, centre=False))).float()(ids).logits.double().log_softmax(-1)
    assert float((ref.exp() * (ref - got)).sum(-1).max()) < 1e-6


@pytest.mark.parametrize("family", ["llama", "mistral", "llama3"])
def test_engine_form_is_exact_for_bias_free_families(converted, tmp_path, family):
    from transformers import DeepseekV3ForCausalLM

    from mla_retrofit.sources import load_model

    native = converted(family, 0.5, **ENGINE)
    report = export_deepseek(str(native), str(tmp_path / "engine"), engine=True, verify_tokens=32)
    assert report.exact and not report.attention_bias and report.q_lora_rank is None and not report.dropped_biases
    assert report.kv_lora_rank == json.loads((native / "config.json").read_text())["kv_lora_ranks"][0]  # no extra channel
    assert report.fidelity["kl_max"] < KL_EXACT
    ds = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "engine"), dtype=torch.float64).eval()
    assert not [k for k in ds.state_dict() if k.endswith(".bias")]
    ids = tiny_tokenizer()("A quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = load_model(str(native)).double()(ids).logits.log_softmax(-1)
        got = ds(ids).logits.log_softmax(-1)
    assert float((ref.exp() * (ref - got)).sum(-1).max()) < KL_EXACT


def test_engine_form_spells_plain_rope_as_unit_yarn_and_computes_the_same(converted, tmp_path):
    """Factor-1 yarn (engines' DeepSeek RoPE path) is the plain table: same logits as the plain spelling, and GGUF
    takes it (llama.cpp's deepseek2 applies only DeepSeek's yarn, at factor 1 nothing)."""
    from transformers import DeepseekV3ForCausalLM

    native = converted("llama", 0.5, **ENGINE)
    yarn = export_deepseek(str(native), str(tmp_path / "yarn"), engine=True, verify_tokens=16)
    plain = export_deepseek(str(native), str(tmp_path / "plain"), engine=True, verify_tokens=16, yarn_rope=False)
    assert yarn.rope_parameters["rope_type"] == "yarn" and yarn.rope_parameters["factor"] == 1.0
    assert plain.rope_parameters["rope_type"] == "default" and yarn.engine_compatible
    ids = tiny_tokenizer()("A quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = (DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / d), dtype=torch.float64).eval()(ids).logits
                for d in ("yarn", "plain"))
    assert float((a - b).abs().max()) < 1e-9
    export_gguf(str(tmp_path / "yarn"), str(tmp_path / "m.gguf"))
    _, fields, _ = read_gguf(tmp_path / "m.gguf")
    assert not any(k.startswith("deepseek2.rope.scaling") for k in fields)


def test_engine_form_keeps_norms_exact_when_the_source_eps_is_not_1e6(tmp_path):
    """eps 1e-5 -> every RMSNorm runs with 1e-6 on a residual stream scaled by sqrt(0.1)."""
    from test_export import native_model
    from transformers import DeepseekV3ForCausalLM

    from mla_retrofit.sources import load_model

    src = native_model(tmp_path / "native", biases=False, rms_norm_eps=1e-5)
    report = export_deepseek(str(src), str(tmp_path / "engine"), engine=True, verify_tokens=32)
    assert report.residual_scale == pytest.approx(math.sqrt(0.1)) and report.exact
    assert report.fidelity["kl_max"] < KL_EXACT
    ds = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "engine"), dtype=torch.float64).eval()
    assert ds.config.rms_norm_eps == DS_NORM_EPS
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        ref = load_model(str(src)).double()(ids).logits.log_softmax(-1)
        got = ds(ids).logits.log_softmax(-1)
    assert float((ref.exp() * (ref - got)).sum(-1).max()) < KL_EXACT


def test_engine_form_of_biased_models_is_flagged_approximate(converted, tmp_path):
    centred = export_deepseek(str(converted("llama", 0.5, rope_layout="deepseek", rank_allocation="uniform")),
                              str(tmp_path / "a"), engine=True, verify_tokens=16)
    assert not centred.exact and "kv_a_proj.bias" in centred.dropped_biases
    assert any("--no-centre" in n for n in centred.notes)
    qwen2 = export_deepseek(str(converted("qwen2", 0.5, **ENGINE)), str(tmp_path / "b"), engine=True, verify_tokens=16)
    assert not qwen2.exact and {"q_proj.bias", "kv_a_proj.bias"} <= set(qwen2.dropped_biases)
    assert not any("--no-centre" in n for n in qwen2.notes)


# -- GGUF -------------------------------------------------------------------------------------------------

def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return gguf, fields, tensors


def dequant(gguf, t) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).double()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_gguf_has_what_llamacpp_deepseek2_loads(converted, tmp_path, family):
    native = converted(family, 0.5, **ENGINE)
    out = tmp_path / "m.gguf"
    rep = export_gguf(str(native), str(out), "f32")
    g, fields, tensors = read_gguf(out)
    arch = fields["general.architecture"]
    assert arch == "deepseek2"
    for key in REQUIRED_KEYS:
        assert f"{arch}.{key}" in fields, key
    assert fields[f"{arch}.leading_dense_block_count"] == fields[f"{arch}.block_count"] == 2
    assert f"{arch}.expert_count" not in fields  # dense: 0 experts, no expert groups
    assert fields[f"{arch}.attention.q_lora_rank"] == 0 and fields[f"{arch}.attention.head_count_kv"] == 1
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert key in fields, key
    assert len(fields["tokenizer.ggml.tokens"]) == 512

    cfg = json.loads((native / "config.json").read_text())
    d, n_h, nope, r = 64, 4, 16, cfg["kv_lora_ranks"][0]
    rope = fields[f"{arch}.rope.dimension_count"]
    shapes = {"token_embd.weight": [d, 512], "output_norm.weight": [d], "output.weight": [d, 512]}
    for i in range(2):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": [d], b + "attn_kv_a_norm.weight": [r], b + "attn_q.weight": [d, n_h * (nope + rope)],
            b + "attn_kv_a_mqa.weight": [d, r + rope], b + "attn_k_b.weight": [nope, r, n_h],
            b + "attn_v_b.weight": [r, nope, n_h], b + "attn_output.weight": [n_h * nope, d], b + "ffn_norm.weight": [d],
            b + "ffn_gate.weight": [d, 128], b + "ffn_up.weight": [d, 128], b + "ffn_down.weight": [128, d],
        })
    assert {k: [int(x) for x in t.shape] for k, t in tensors.items()} == shapes
    assert rep.cache_values_per_token == 2 * (r + rope) and not rep.tied_output

    # the split kv_b is the engine export's kv_b_proj, value for value
    from safetensors import safe_open

    ds_dir = tmp_path / "ds"
    export_deepseek(str(native), str(ds_dir), engine=True, dtype="float32", verify_tokens=0)
    with safe_open(str(ds_dir / "model.safetensors"), "pt") as f:
        kv_b = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").double().view(n_h, 2 * nope, r)
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight").double()
    k_b = dequant(g, tensors["blk.1.attn_k_b.weight"])  # numpy order [n_h, r, nope]
    v_b = dequant(g, tensors["blk.1.attn_v_b.weight"])  # [n_h, nope, r]
    assert torch.equal(k_b, kv_b[:, :nope].transpose(1, 2)) and torch.equal(v_b, kv_b[:, nope:])
    assert torch.equal(dequant(g, tensors["blk.1.attn_q.weight"]), q)


def test_gguf_types_keep_the_latent_rows_representable(converted, tmp_path):
    native = converted("llama", 0.5, **ENGINE)
    for outtype, main in (("bf16", "BF16"), ("f16", "F16"), ("q8_0", "Q8_0")):
        export_gguf(str(native), str(tmp_path / f"{outtype}.gguf"), outtype)
        g, _, tensors = read_gguf(tmp_path / f"{outtype}.gguf")
        assert tensors["blk.0.attn_kv_a_mqa.weight"].tensor_type.name in ("BF16", "F32")
        assert tensors["blk.0.attn_kv_a_norm.weight"].tensor_type.name == "F32"
        assert tensors["blk.0.ffn_up.weight"].tensor_type.name == main
        latent = dequant(g, tensors["blk.0.attn_kv_a_mqa.weight"])
        assert latent.abs().max() > 0 and latent.abs()[:16].max() < 1e-3  # tiny, but not flushed to zero


def test_gguf_of_a_tied_model_shares_the_embeddings(tmp_path):
    """A tied head stays tied (no output.weight) through the engine form's residual scale (eps 1e-5)."""
    from test_export import native_model

    src = native_model(tmp_path / "native", biases=False, rms_norm_eps=1e-5, tie_word_embeddings=True)
    rep = export_gguf(str(src), str(tmp_path / "m.gguf"))
    _, _, tensors = read_gguf(tmp_path / "m.gguf")
    assert rep.tied_output and "output.weight" not in tensors and "token_embd.weight" in tensors
    assert rep.deepseek["exact"] and rep.deepseek["fidelity"]["kl_max"] < KL_EXACT


def test_gguf_refuses_rope_scaling(converted, tmp_path):
    """The llama3 family's RoPE scaling has no llama.cpp deepseek2 form."""
    native = converted("llama3", 0.5, **ENGINE)
    with pytest.raises(UserError, match="RoPE scaling 'llama3'") as err:
        export_gguf(str(native), str(tmp_path / "m.gguf"), "f32")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()


def test_gguf_refusals(converted, tmp_path):
    native = converted("llama", 0.5, **ENGINE)
    with pytest.raises(UserError, match="ending in .gguf"):
        export_gguf(str(native), str(tmp_path / "m.bin"))
    with pytest.raises(UserError, match="unknown GGUF type"):
        export_gguf(str(native), str(tmp_path / "m.gguf"), "q4_k")
    exact = tmp_path / "exact"
    export_deepseek(str(native), str(exact), verify_tokens=0)
    with pytest.raises(UserError, match="--engine"):
        export_gguf(str(exact), str(tmp_path / "m.gguf"))
    with pytest.raises(UserError, match="Qwen3-style"):
        export_gguf(str(converted("qwen3", 0.5, rope_layout="deepseek", rank_allocation="uniform")),
                    str(tmp_path / "q3.gguf"))
    (tmp_path / "there.gguf").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        export_gguf(str(native), str(tmp_path / "there.gguf"))
    assert not list(tmp_path.glob(".*tmp*"))  # no partial file left behind


def test_cli_exports_gguf(converted, tmp_path):
    from typer.testing import CliRunner

    from mla_retrofit_cli.main import app

    native = converted("mistral", 0.5, **ENGINE)
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(app, ["export", str(native), str(out), "--format", "gguf", "--outtype", "q8_0"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "deepseek2" in res.output
    res = CliRunner().invoke(app, ["export", str(native), str(tmp_path / "e"), "--engine", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["exact"] is True


def test_heal_trains_the_engine_form_at_its_natural_scale_and_writes_it_back(converted, tmp_path):
    """The linear-regime rows (~1e-8) are scaled up for training and down on save: both exact."""
    from transformers import DeepseekV3ForCausalLM

    from mla_retrofit.heal import models

    export_deepseek(str(converted("llama", 0.5, **ENGINE)), str(tmp_path / "engine"), engine=True, verify_tokens=0)
    plain = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "engine"), dtype=torch.float32).eval()
    student = models.load_student(str(tmp_path / "engine")).eval()
    r = plain.config.kv_lora_rank
    rows = student.model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    assert rows[:r].abs().mean() > 0.1 * rows[r:].abs().mean()  # no longer ~1e-7 of the RoPE rows
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    models.save_student(student, tmp_path / "back", None, {})
    back = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).state_dict()
    for k, v in plain.state_dict().items():
        assert torch.allclose(back[k], v, rtol=1e-6, atol=0), k


def test_imitation_targets_follow_the_engine_forms_residual_scale(tmp_path):
    """Source eps 1e-5: the engine form's attention outputs are sqrt(0.1) times the teacher's; phase 1 knows."""
    from tiny import save_tiny

    from mla_retrofit.convert.pipeline import ConvertConfig, convert
    from mla_retrofit.heal import models
    from mla_retrofit.heal.losses import imitation_loss
    from mla_retrofit.heal.models import causal_mask
    from mla_retrofit.sources import load_model

    src = save_tiny("llama", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    native = tmp_path / "native"
    convert(ConvertConfig(model=str(src), output=str(native), kv_ratio=0.5, calib_samples=8, calib_seq_len=96,
                          eval_samples=2, eval_seq_len=64, **ENGINE))
    export_deepseek(str(native), str(tmp_path / "engine"), engine=True, verify_tokens=0)
    teacher = load_model(str(src)).eval()
    ids = torch.arange(5, 37)[None]
    pos = torch.arange(32)[None]
    losses = {}
    for name in ("native", "engine"):
        student = models.load_student(str(tmp_path / name)).eval()
        inputs, targets = models.teacher_attention(teacher, student, ids, pos)  # what phase 1 trains toward
        stack = models.AttentionStack(student)
        with torch.no_grad():
            out = stack(inputs, student.model.rotary_emb(inputs[0], pos), causal_mask(student.config, inputs[0], pos))
        losses[name] = (models.residual_scale(student, teacher), float(imitation_loss(out, targets)))
    assert losses["native"][0] == 1.0 and losses["engine"][0] == pytest.approx(math.sqrt(0.1))
    assert losses["engine"][1] == pytest.approx(losses["native"][1], rel=1e-4)


def test_gguf_tokenizer_comes_from_a_gguf_of_the_source_when_recorded(converted, tmp_path):
    """--tokenizer-gguf, or a source recorded as a .gguf (export.json of an engine export), is copied as is."""
    native = converted("llama", 0.5, **ENGINE)
    first = tmp_path / "first.gguf"
    export_gguf(str(native), str(first))  # tokenizer built from tokenizer.json
    second = export_gguf(str(native), str(tmp_path / "second.gguf"), tokenizer_gguf=str(first))
    assert second.tokenizer_from == str(first) and not second.notes
    engine = tmp_path / "engine"
    export_deepseek(str(native), str(engine), engine=True, verify_tokens=0)
    record = json.loads((engine / "export.json").read_text())
    (engine / "export.json").write_text(json.dumps({**record, "source_model": str(first)}))
    third = export_gguf(str(engine), str(tmp_path / "third.gguf"))
    assert third.tokenizer_from == str(first)
    _, a, _ = read_gguf(first)
    _, b, _ = read_gguf(tmp_path / "third.gguf")
    tok_keys = sorted(k for k in a if k.startswith("tokenizer."))
    assert tok_keys == sorted(k for k in b if k.startswith("tokenizer.")) and tok_keys
    assert all(a[k] == b[k] for k in tok_keys)

"""DeepSeek-V3 export: pure maths on small tensors, refusals, and exported tiny models loaded by stock transformers.

The stock-load checks run in ONE fresh subprocess for all cases (importing
transformers costs seconds on a shared CPU) with ``sys.modules['mla_retrofit'] = None``,
so the export provably needs nothing from this project.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mla_retrofit.errors import UserError
from mla_retrofit.export import export_deepseek
from mla_retrofit.export.latent_norm import apply_norm, constant_channel, latent_bound
from mla_retrofit.export.rope_table import fit_rope_table, rope_rows
from tiny import tiny_tokenizer

KL_MAX = 1e-8  # float32 forwards of two exact forms; measured ~1e-11 (the exporter's own check reports it)
GEN_TOKENS = 32


# -- pure maths -------------------------------------------------------------------------------------

def test_constant_channel_turns_rmsnorm_into_a_fixed_rescale():
    torch.manual_seed(0)
    d, r, n = 32, 11, 16  # 11 real channels, 4 zero padding, 1 constant
    w_c, b_c, g = torch.randn(r, d, dtype=torch.float64), torch.randn(r, dtype=torch.float64), torch.rand(d) + 0.5
    ch = constant_channel(latent_bound(w_c, b_c, g), n=n)
    assert math.log2(ch.k).is_integer() and math.log2(ch.w).is_integer()  # exact in bf16/fp16 storage
    x_hat = torch.randn(200, d, dtype=torch.float64)
    x_hat = x_hat / x_hat.norm(dim=-1, keepdim=True) * math.sqrt(d)  # RMSNorm outputs have |x_hat| = sqrt(d)
    x = x_hat * g.double()
    c = x @ w_c.T + b_c
    latent = torch.zeros(200, n, dtype=torch.float64)
    latent[:, :r], latent[:, -1] = ch.lam * c, ch.k
    weight = torch.full((n,), ch.w, dtype=torch.float64)
    out = apply_norm(latent, weight)[:, :r]
    rel = ((out - c).norm(dim=-1) / c.norm(dim=-1)).max()
    assert rel <= ch.delta_bound * 1.01 and ch.delta_bound <= 1e-6


def test_rope_table_even_frequencies_keep_theta():
    """Llama-style h=128 keeping t = 0, 2, ..., 62 is exactly DeepSeek's 64-dim table with the same theta."""
    h, theta = 128, 500000.0
    inv = 1.0 / theta ** (torch.arange(0, h, 2).double() / h)
    idx = [list(range(0, 64, 2))] * 3
    table = fit_rope_table(idx, inv.float(), {"rope_type": "default", "rope_theta": theta}, h, 4096)
    assert table.dim == 64 and table.rope_parameters["rope_theta"] == pytest.approx(theta)
    assert table.engine_ok and table.max_freq_rel_error < 1e-6
    # first frequencies t = 0..31 need theta ** (64 / 128)
    table = fit_rope_table([list(range(32))], inv.float(), {"rope_type": "default", "rope_theta": theta}, h, 4096)
    assert table.rope_parameters["rope_theta"] == pytest.approx(theta**0.5)


def test_rope_table_refusals_and_padding():
    h = 16
    inv = (1.0 / 10000.0 ** (torch.arange(0, h, 2).double() / h)).float()
    params = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(UserError, match="several RoPE components"):
        fit_rope_table([[0, 0, 1, 1]], inv, params, h, 512)
    with pytest.raises(UserError, match="pad_rope"):
        fit_rope_table([[0, 1, 3]], inv, params, h, 512)
    with pytest.raises(UserError, match="different RoPE frequencies"):
        fit_rope_table([[0, 1], [0, 2]], inv, params, h, 512)
    table = fit_rope_table([[0, 1, 3]], inv, params, h, 512, pad=True)
    assert table.n_pairs == 4 and table.slots == [[0, 1, 3]]
    table = fit_rope_table([[0, 2, 6]], inv, params, h, 512, pad=True)
    assert (table.step, table.n_pairs) == (2, 4)


def test_rope_rows_layouts():
    assert rope_rows([0, 2], 4, interleave=False).tolist() == [0, 2, 4, 6]
    assert rope_rows([0, 2], 4, interleave=True).tolist() == [0, 4, 1, 5]


# -- native models built by hand (fast; per-layer ranks, frequencies and biases chosen freely) ----------

def native_model(directory: Path, ranks=(16, 16), freq=None, q_bias=False, seed=0, biases=True,
                 rms_norm_eps=1e-6, tie_word_embeddings=False) -> Path:
    from mla_retrofit.checkpoint import save_mla_model
    from mla_retrofit.modeling.configuration_mla import MLARetrofitConfig
    from mla_retrofit.modeling.modeling_mla import MLARetrofitForCausalLM

    n = len(ranks)
    cfg = MLARetrofitConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        kv_groups=2, num_key_value_heads=2, head_dim=16, kv_lora_ranks=list(ranks),
        rope_freq_idx=freq or [list(range(8))] * n, attention_bias=q_bias, kv_a_bias=biases, o_bias=biases,
        rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.15, eos_token_id=0, pad_token_id=0, bos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = MLARetrofitForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "q_rope" in name:
                p.normal_(0.0, 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    save_mla_model(model, directory, tokenizer=tiny_tokenizer())
    return directory


def test_non_uniform_ranks_refused_unless_padded(tmp_path):
    src = native_model(tmp_path / "native", ranks=(6, 12))
    with pytest.raises(UserError, match="--pad-ranks"):
        export_deepseek(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    report = export_deepseek(str(src), str(tmp_path / "out"), pad_ranks=True, verify_tokens=32)
    assert report.kv_lora_rank == 13  # max rank + the constant channel
    assert report.cache_breakdown["rank_padding"] == 6 and report.cache_breakdown["constant_channel"] == 2
    assert report.cache_values_export == 2 * (13 + 16) and report.cache_values_native == 6 + 12 + 2 * 16
    assert report.fidelity["kl_max"] < KL_MAX


def test_flashmla_target_and_refusal(tmp_path):
    src = native_model(tmp_path / "native", ranks=(20, 20))
    report = export_deepseek(str(src), str(tmp_path / "out"), flashmla=True, verify_tokens=32)
    assert (report.kv_lora_rank, report.qk_rope_head_dim) == (512, 64)
    assert report.cache_breakdown["rope_padding"] == 2 * (64 - 16)
    assert report.fidelity["kl_max"] < KL_MAX
    big = native_model(tmp_path / "big", ranks=(512, 512))
    with pytest.raises(UserError, match="FlashMLA needs kv_lora_rank 512"):
        export_deepseek(str(big), str(tmp_path / "out2"), flashmla=True)


def test_free_rope_layout_refused(tmp_path):
    src = native_model(tmp_path / "native", freq=[[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    with pytest.raises(UserError, match="--rope-layout deepseek"):
        export_deepseek(str(src), str(tmp_path / "out"))


def test_qwen3_refused(converted, tmp_path):
    from mla_retrofit.convert.pipeline import ConvertConfig

    kw = {"rope_layout": "deepseek"} if "rope_layout" in ConvertConfig.model_fields else {}
    native = converted("qwen3", 0.5, rank_allocation="uniform", **kw)
    with pytest.raises(UserError, match="Qwen3-style") as err:
        export_deepseek(str(native), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_not_a_native_checkpoint_refused(tiny_src, tmp_path):
    with pytest.raises(UserError, match="not a native MLA"):
        export_deepseek(str(tiny_src("llama")), str(tmp_path / "out"))


def test_existing_output_refused_without_overwrite(tmp_path):
    src = native_model(tmp_path / "native")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="overwrite"):
        export_deepseek(str(src), str(out), verify_tokens=0)
    assert (out / "keep.txt").is_file()


def test_bias_free_export_has_no_bias_tensors(tmp_path):
    src = native_model(tmp_path / "native", q_bias=True)
    report = export_deepseek(str(src), str(tmp_path / "out"), biases=False, verify_tokens=32)
    assert not report.exact and not report.attention_bias and report.q_lora_rank is None
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".bias")]
    assert math.isfinite(report.fidelity["kl_mean"])


# -- conversions of tiny models of every family, loaded by stock transformers ---------------------------

STOCK_SCRIPT = r"""
import sys, json
sys.modules["mla_retrofit"] = None  # the export must not need this project
import torch
from transformers import DeepseekV3ForCausalLM
cases = json.loads(sys.argv[1])
out = {}
for name, (path, ids) in cases.items():
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
        gen = model.generate(ids[:, :16], max_new_tokens=%d, min_new_tokens=%d, do_sample=False)
    ours = sorted(k for k, m in sys.modules.items() if k.startswith("mla_retrofit") and m is not None)
    out[name] = {"logits": logits, "gen": gen[0], "class": type(model).__name__,
                 "interleave": model.config.rope_interleave, "modules": ours}
torch.save(out, sys.argv[2])
""" % (GEN_TOKENS, GEN_TOKENS)

# name -> (family, export kwargs)
CASES = {
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),  # llama3 RoPE scaling, tied embeddings
    "qwen2": ("qwen2", {}),  # q/k/v biases: query bias through the q_lora path
    "mistral": ("mistral", {"rope_interleave": False}),
}


def _ids() -> list[int]:
    text = "The quick brown fox jumps over the lazy dog while the json module parses a file."
    return tiny_tokenizer()(text * 3, add_special_tokens=False)["input_ids"][:40]


@pytest.fixture(scope="module")
def stock(converted, tmp_path_factory):
    """Export each case, then load all exports in one fresh subprocess; ``{name: (native_dir, report, result)}``."""
    from mla_retrofit.convert.pipeline import ConvertConfig

    if "rope_layout" not in ConvertConfig.model_fields:
        pytest.skip("this checkout's convert has no rope_layout option")
    root = tmp_path_factory.mktemp("export")
    ids = _ids()
    made, cases = {}, {}
    for name, (family, kw) in CASES.items():
        native = converted(family, 0.5, rank_allocation="uniform", rope_layout="deepseek")
        try:
            report = export_deepseek(str(native), str(root / name), **kw)
        except UserError as e:  # a clear refusal is an allowed outcome; the test reports it
            made[name] = (native, e, None)
            continue
        made[name] = (native, report, None)
        cases[name] = (str(root / name), ids)
    result_file = root / "stock.pt"
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(cases), str(result_file)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(result_file)
    return {name: (n, r, results.get(name)) for name, (n, r, _) in made.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_matches_native(stock, name):
    from mla_retrofit.sources import load_model

    native_dir, report, res = stock[name]
    if isinstance(report, UserError):
        pytest.fail(f"export refused: {report}")
    assert res["class"] == "DeepseekV3ForCausalLM" and res["modules"] == []
    assert res["interleave"] == CASES[name][1].get("rope_interleave", True)
    model = load_model(str(native_dir))
    ids = torch.tensor([_ids()])
    with torch.no_grad():
        ref = model(ids).logits[0]
        gen = model.generate(ids[:, :16], max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False)
    lp, lq = ref.double().log_softmax(-1), res["logits"].double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert float(kl.max()) < KL_MAX, f"{name}: KL per token max {float(kl.max()):.3e}"
    assert torch.equal(gen[0], res["gen"]), f"{name}: greedy generations differ"
    assert report.fidelity["kl_max"] < KL_MAX  # the exporter's own streamed measurement agrees


def test_export_record_and_tokenizer(stock):
    native_dir, report, _ = stock["qwen2"]
    out = Path(report.output)
    record = json.loads((out / "export.json").read_text())
    assert record["report"]["fidelity"]["kl_max"] < KL_MAX and record["settings"]["pad_ranks"] is False
    assert report.q_lora_rank == 64 + 1  # the query bias rides a constant channel of q_a_proj
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and isinstance(cfg["n_routed_experts"], int)
    assert "auto_map" not in cfg
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    llama3 = stock["llama3"][1]
    assert llama3.rope_parameters["rope_type"] == "llama3" and not llama3.engine_compatible


TOKENIZER_SCRIPT = """
import sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from mla_retrofit.sources import load_tokenizer
export_dir, native_dir = sys.argv[1:3]
print(type(AutoTokenizer.from_pretrained(export_dir)).__name__)        # plain: no remote code needed
print(type(PreTrainedTokenizerFast.from_pretrained(native_dir)).__name__)
print(type(load_tokenizer(native_dir)).__name__)
"""


def test_tokenizers_load_silently_in_a_fresh_process_without_a_terminal(stock):
    """No prompt, no remote code: the exported checkpoint through plain AutoTokenizer; the native one through
    the tokenizer class itself or our loader (AutoTokenizer reads config.json first, see docs/formats.md)."""
    native_dir, report, _ = stock["qwen2"]
    proc = subprocess.run([sys.executable, "-c", TOKENIZER_SCRIPT, str(report.output), str(native_dir)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          start_new_session=True)  # a new session has no controlling terminal
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.split()) == 3, proc.stdout
    assert "custom code" not in proc.stdout + proc.stderr and "trust_remote_code" not in proc.stdout + proc.stderr

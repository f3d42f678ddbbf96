"""The MLA runtime: lossless construction, cached decode, absorbed attention, cache bytes, save/load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from mla_retrofit.bench.kv import analytic_bytes, measure_generate, measured_bytes
from tiny import FAMILIES


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_construction_reproduces_logits(family, tiny_src, converted):
    orig = AutoModelForCausalLM.from_pretrained(str(tiny_src(family))).eval()
    mla = _load(converted(family, 1.0))
    assert mla.config.kv_lora_ranks == [32, 32] and all(len(f) == 16 for f in mla.config.rope_freq_idx)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(mla(ids).logits, orig(ids).logits) <= 1e-5


def _cached_vs_full(mla, ids, new_tokens=16):
    """Greedy-generate with the cache, then replay token by token with the cache: each step's logits against the
    full (uncached) forward's at that position, as a relative max error; also whether the generated tokens are
    the full forward's argmaxes."""
    with torch.no_grad():
        gen = mla.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        full = mla(gen, use_cache=False).logits
        out = mla(ids, use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        for t in range(ids.shape[1], gen.shape[1] - 1):
            out = mla(gen[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    ref = full[:, ids.shape[1] - 1 : -1]
    return _rel(torch.stack(steps, 1), ref), torch.equal(gen[:, ids.shape[1]:], ref.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decode_equals_full_forward(family, converted):
    mla = _load(converted(family, 0.5))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    rel, greedy_agrees = _cached_vs_full(mla, ids)
    assert rel <= 1e-5 and greedy_agrees


def _set_mode(model, mode):
    for layer in model.model.layers:
        layer.self_attn.attn_mode = mode


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_absorbed_equals_expanded(family, converted):
    mla = _load(converted(family, 0.5))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    results = {}
    with torch.no_grad():
        for mode in ("expanded", "absorbed"):
            _set_mode(mla, mode)
            prefill = mla(ids[:, :15], use_cache=True)  # with a cache: absorbed runs its own causal mask
            step = mla(ids[:, 15:], cache=prefill.cache, use_cache=True)
            results[mode] = (prefill.logits, step.logits)
    _set_mode(mla, "auto")
    assert _rel(results["absorbed"][0], results["expanded"][0]) <= 1e-5
    assert _rel(results["absorbed"][1], results["expanded"][1]) <= 1e-5


def test_cache_holds_exactly_the_latent(converted):
    mla = _load(converted("llama", 0.5, layers=3, rank_allocation="adaptive"))
    per_layer = [r + 2 * len(f) for r, f in zip(mla.config.kv_lora_ranks, mla.config.rope_freq_idx)]
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    m = measure_generate(mla, ids, new_tokens=7)
    n_cached = 10 + 7 - 1  # the last generated token is never fed back
    assert m.cached_tokens == n_cached
    assert m.measured_bytes == m.analytic_bytes == 2 * n_cached * sum(per_layer) * 4


def _decode(mla, ids, steps, cache=None):
    """Prefill ``ids`` then ``steps`` greedy steps through forward(); logits of every step and the cache."""
    out = mla(ids, cache=cache, use_cache=True)
    cache, logits = out.cache, [out.logits[:, -1]]
    for _ in range(steps):
        out = mla(logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def test_latent_cache_writes_in_place_and_matches_cat(converted, monkeypatch):
    mla = _load(converted("qwen2", 0.5))
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(11))
    module = sys.modules[type(mla).__module__]
    with torch.no_grad():
        fast, cache = _decode(mla, ids, 70)
        layer = cache.layers[0]
        assert isinstance(layer, module.LatentCacheLayer)
        n = layer.keys.shape[-2]
        assert n == 80 and layer.keys.data_ptr() == layer._buffer.data_ptr()
        row = layer.keys[..., :1, :].numel() * 4
        # Head-room at most 1/32 of the length (rounded up): the bytes held stay the bytes used, nearly.
        assert n * row <= layer._buffer.untyped_storage().nbytes() <= (n + -(-n // 32)) * row
        # Reallocations only every ceil(n/32) tokens (here >= 3), not at every step as torch.cat does.
        ptrs = set()
        for _ in range(20):
            mla(ids[:, :1], cache=cache, use_cache=True)
            ptrs.add(cache.layers[0]._buffer.data_ptr())
        assert len(ptrs) <= 1 + 20 // 3
        monkeypatch.setattr(module, "use_latent_layers", lambda *a, **k: None)
        ref, ref_cache = _decode(mla, ids, 70)
        assert type(ref_cache.layers[0]) is not module.LatentCacheLayer
    assert _rel(fast, ref) <= 1e-6


def test_latent_cache_crop_beams_and_grad(converted):
    mla = _load(converted("llama", 0.5))
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        # Crop back (as assisted decoding does), then decode again: same as a fresh run.
        full, cache = _decode(mla, ids, 12)
        cache.crop(-12)
        again = [mla(full[:, 0].argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]]
        assert _rel(again[0], full[:, 1]) <= 1e-5
        # Beam search reorders the cache (index_select replaces the buffer): same beams as a cat cache.
        beams = mla.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        module = sys.modules[type(mla).__module__]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "use_latent_layers", lambda *a, **k: None)
            ref = mla.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(beams, ref)
    # With gradients flowing through the cache the layer falls back to concatenation: backward works.
    out = mla(ids, use_cache=True)
    out2 = mla(ids[:, :2], cache=out.cache, use_cache=True)
    (out.logits.sum() + out2.logits.sum()).backward()
    assert mla.model.layers[0].self_attn.kv_a_proj.weight.grad is not None


def test_generate_stopping_early_reserves_nothing_ahead(converted):
    """A long max_new_tokens that stops early must not hold the cache of tokens never generated."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    mla = _load(converted("llama", 0.5))
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        out = mla.generate(ids, max_new_tokens=400, do_sample=False, return_dict_in_generate=True,
                           stopping_criteria=StoppingCriteriaList([StopAfter(30)]))
    n = out.cache.get_seq_length()
    assert out.sequences.shape[1] == 30 and n == 29
    used = analytic_bytes(mla.config, n, 1, 4)
    assert used <= measured_bytes(out.cache) <= analytic_bytes(mla.config, n + -(-n // 32), 1, 4)


def test_gqa_cache_bytes_match_analytic(tiny_src):
    orig = AutoModelForCausalLM.from_pretrained(str(tiny_src("qwen2"))).eval()
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(5))
    m = measure_generate(orig, ids, new_tokens=5)
    assert m.measured_bytes == m.analytic_bytes == 13 * 2 * (2 * 2 * 16) * 4


def test_per_layer_ranks_and_freqs_cache_bytes():
    from mla_retrofit.modeling.configuration_mla import MLARetrofitConfig
    from mla_retrofit.modeling.modeling_mla import MLARetrofitForCausalLM

    cfg = MLARetrofitConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, kv_groups=2, head_dim=8, kv_lora_ranks=[3, 7, 5],
                            rope_freq_idx=[[0], [1, 2, 3], []], pad_token_id=0)
    torch.manual_seed(0)
    model = MLARetrofitForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 6))
    m = measure_generate(model, ids, new_tokens=4)
    assert m.measured_bytes == 3 * 9 * (5 + 13 + 5) * 4 == analytic_bytes(cfg, 9, 3, 4)


def test_left_padded_batch_matches_single_sequences(converted):
    from tiny import tiny_tokenizer

    mla = _load(converted("mistral", 0.5))
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    prompts = ["def parse(self, text):", "The cache holds the latent only"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = mla.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        for i, p in enumerate(prompts):
            single = tok(p, return_tensors="pt")
            one = mla.generate(**single, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            assert torch.equal(out[i, -8:], one[0, -8:])


def test_static_cache_generate_matches_dynamic(converted):
    mla = _load(converted("llama", 0.5))
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dyn = mla.generate(ids, max_new_tokens=10, do_sample=False)
        sta = mla.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(dyn, sta)


def test_static_cache_decode_step_traces_without_graph_breaks(converted):
    """torch.compile (CUDA graphs) needs one graph per decode step: no branch may read a cache length."""
    import torch._dynamo as dynamo
    from transformers import StaticCache

    mla = _load(converted("qwen3", 0.5))
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = StaticCache(config=mla.config, max_cache_len=16)
        token = mla(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        explained = dynamo.explain(mla)(token, cache=cache, use_cache=True)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_save_load_fresh_process_without_project(converted, tmp_path):
    """Loads with trust_remote_code in a new interpreter where importing mla_retrofit fails."""
    path = converted("qwen3", 0.5)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(7))
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["mla_retrofit"] = None  # the checkpoint must not need the project
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        assert "mla_retrofit" not in type(m).__module__.split(".")[0]
        with torch.no_grad():
            logits = m(torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save({{"logits": logits, "state": {{k: v.clone() for k, v in m.state_dict().items()}}}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(got["state"][k], v), k
    mla = _load(path)
    with torch.no_grad():
        assert torch.equal(mla(ids).logits, got["logits"])


def test_conversion_record_names_source(converted, tiny_src):
    rec = json.loads((converted("llama", 0.5) / "conversion.json").read_text())
    assert rec["source_model"] == str(tiny_src("llama"))
    assert len(rec["layers"]) == 2 and rec["kv_values_per_token"]["ratio"] == 0.5


def _custom_conversions(cfg, tmp_path, ratios=(1.0, 0.5), seed=0):
    """A random model of ``cfg`` (norms not at 1) saved with the tiny tokenizer, and its conversions by ratio."""
    from mla_retrofit.convert.pipeline import ConvertConfig, convert
    from tiny import tiny_tokenizer

    torch.manual_seed(seed)
    original = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    original.save_pretrained(str(tmp_path / "src"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "src"))
    converted = {}
    for ratio in ratios:
        out = tmp_path / f"mla{ratio}"
        convert(ConvertConfig(model=str(tmp_path / "src"), output=str(out), kv_ratio=ratio, calib_samples=4,
                              calib_seq_len=64, eval_samples=1, eval_seq_len=32))
        converted[ratio] = _load(out)
    return original, converted


def test_sliding_window_mistral_is_exact_and_its_cache_agrees(tmp_path):
    """A window of 8 tokens on sequences of 30-40: ratio 1 reproduces the original, cached decode = full."""
    from tiny import tiny_config

    cfg = tiny_config("mistral")
    cfg.sliding_window = 8
    original, converted = _custom_conversions(cfg, tmp_path)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = original(ids).logits
        assert _rel(converted[1.0](ids).logits, ref) <= 1e-5
        no_window = AutoModelForCausalLM.from_config(tiny_config("mistral"), attn_implementation="sdpa")
        no_window.load_state_dict(original.state_dict())
        assert _rel(no_window.eval()(ids).logits, ref) > 1e-3  # the window matters at this length
    for mla in converted.values():
        assert mla.config.sliding_window == 8
        assert _cached_vs_full(mla, ids[:, :12], new_tokens=20)[0] <= 1e-5


def test_yarn_rope_with_attention_scaling_is_exact_at_ratio_one_and_caches_below_it(tmp_path):
    """YaRN scales cos/sin by its attention factor (!= 1 here): the MLA runtime must apply it to the kept
    pairs exactly as the source does, at full rank and in the cached decode of a 50% conversion."""
    from transformers import LlamaConfig

    from tiny import tiny_config

    base = tiny_config("llama").to_dict()
    base["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 128}
    cfg = LlamaConfig(**{k: v for k, v in base.items() if k in LlamaConfig().to_dict() or k == "rope_parameters"})
    original, converted = _custom_conversions(cfg, tmp_path)
    assert original.model.rotary_emb.attention_scaling > 1.05
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _rel(converted[1.0](ids).logits, original(ids).logits) <= 1e-5
    for mla in converted.values():
        assert _cached_vs_full(mla, ids[:, :12])[0] <= 1e-5

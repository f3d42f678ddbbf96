"""A GGUF source is read lazily, one dequantized tensor at a time, and gives the same tensors, and the same
conversion, as the whole model transformers' GGUF loader dequantizes."""

import pytest
import torch

from tiny import save_tiny_gguf


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # llama: the q/k row permutation is undone
def test_gguf_weights_are_what_transformers_loads(family, tmp_path):
    from mla_retrofit import sources

    path = save_tiny_gguf(family, tmp_path / "m.gguf")
    whole = sources._load_gguf_model(path.parent, path.name, torch.float32).state_dict()
    lazy = sources.resolve(str(path)).weights
    assert set(lazy.names()) == set(whole) - ({"lm_head.weight"} if "lm_head.weight" not in lazy.names() else set())
    for name in lazy.names():
        assert torch.equal(lazy.get(name), whole[name]), name


def test_converting_a_gguf_equals_converting_its_dequantized_model(tmp_path):
    """The same bytes from the GGUF as from an HF directory holding what transformers dequantizes from it (same
    tokenizer), with the default calibration (sampling loads the GGUF whole, the layers are read lazily)."""
    from safetensors.torch import load_file, save_file

    from mla_retrofit import sources
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    path = save_tiny_gguf("qwen2", tmp_path / "m.gguf")
    hf = tmp_path / "hf"
    model = sources._load_gguf_model(path.parent, path.name, torch.float32)
    hf.mkdir()
    model.config.save_pretrained(str(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hf / "model.safetensors"))
    sources.load_tokenizer(str(path)).save_pretrained(str(hf))
    outs = {}
    for name, src in (("gguf", path), ("hf", hf)):
        outs[name] = tmp_path / f"out-{name}"
        convert(ConvertConfig(model=str(src), output=str(outs[name]), kv_ratio=0.5, calib_samples=4,
                              calib_seq_len=48, eval_samples=2, eval_seq_len=32))
    a, b = load_file(outs["gguf"] / "model.safetensors"), load_file(outs["hf"] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_gguf_source_is_not_dequantized_whole(tmp_path, monkeypatch):
    """Resolving a GGUF source reads its metadata only: no whole-model load."""
    from mla_retrofit import sources

    path = save_tiny_gguf("llama", tmp_path / "m.gguf")

    def whole(*a, **k):
        raise AssertionError("the GGUF was dequantized whole")

    monkeypatch.setattr(sources, "_load_gguf_model", whole)
    src = sources.resolve(str(path))
    assert src.weights.get("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)

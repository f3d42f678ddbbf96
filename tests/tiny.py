"""Tiny random-init models of every supported family, built on the fly (nothing is downloaded)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral")


# Pre-tokenizers as the families' own tokenizer.json files write them (SmolLM2, Llama-3, Qwen2/Qwen3); "gpt2" is
# plain byte-level, "whitespace" one no llama.cpp pre-tokenizer reproduces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = ("gpt2", "smollm", "llama3", "qwen2", "whitespace")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt2": lambda: pt.ByteLevel(add_prefix_space=False),
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "llama3": lambda: pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": lambda: pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
        "whitespace": lambda: pt.Sequence([pt.Whitespace(), byte_level]),
    }[pre]()


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(pre: str = "gpt2"):
    """A byte-level BPE tokenizer (vocab 512) trained on the built-in corpus, with one family's pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mla_retrofit.data import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_texts()[:200], trainer)
    if pre == "llama3":  # Llama-3's tokenizer.json: a whole piece found in the vocabulary is one token
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_config(family: str, layers: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  initializer_range=0.15, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**{**common, "tie_word_embeddings": True}, rope_parameters=rope)
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3":
        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(family)


def tiny_model(family: str, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial biases and norms so every code path matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_tiny(family: str, directory: Path, layers: int = 2, seed: int = 0) -> Path:
    model = tiny_model(family, layers, seed)
    model.save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return directory


def save_tiny_gguf(family: str, path: Path, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random model of ``family`` ("llama" or "qwen2") written as a GGUF the way llama.cpp's converter
    lays one out (Llama's q/k rows permuted), with weight matrices in Q8_0 and norms/biases in F32, plus the
    tiny tokenizer's vocabulary. Only what transformers' GGUF loader reads is written."""
    import gguf
    import numpy as np

    model = tiny_model(family, layers, seed)
    c = model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[family]
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab] + [f"<unused{i}>" for i in range(c.vocab_size - len(vocab))])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(0)

    def permute(x, heads):  # llama.cpp's LlamaModel.permute
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        x = t.float().numpy()
        if family == "llama" and hf_name.endswith("q_proj.weight"):
            x = permute(x, c.num_attention_heads)
        elif family == "llama" and hf_name.endswith("k_proj.weight"):
            x = permute(x, c.num_key_value_heads)
        if x.ndim == 2 and x.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

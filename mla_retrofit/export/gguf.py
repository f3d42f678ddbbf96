"""Write a GGUF that stock llama.cpp runs as ``deepseek2`` (MLA with the latent cache), through the ``gguf`` library.

The input is the engine form (:mod:`.deepseek`, ``engine=True``): a bias-free
``DeepseekV3ForCausalLM`` checkpoint. A native checkpoint is first exported to
that form in a temporary directory. What llama.cpp's ``deepseek2`` loader
needs and what this writes (checked against llama.cpp's
``src/models/deepseek2.cpp`` of the pinned version, see ``LLAMACPP_PIN``):

- dense models: ``leading_dense_block_count = n_layers``, no expert count;
- ``attention.q_lora_rank`` is required for any layer count but 26/27 ("Lite"):
  0 selects the plain ``attn_q`` path (no extra ``q_a``/``q_b`` weights);
- ``kv_b_proj`` split into ``attn_k_b`` (``[H, r, nope]``, transposed) and
  ``attn_v_b`` (``[H, v, r]``), as llama.cpp's own converter does;
- ``output.weight`` is left out when the head equals the embeddings (tied);
- the tokenizer is copied from a GGUF of the source model when there is one
  (the embedded default, a ``.gguf`` source, or ``tokenizer_gguf``), else built
  from the checkpoint's ``tokenizer.json`` (byte-level BPE) with the llama.cpp
  pre-tokenizer that splits text as it does (:mod:`.pretokenizer`), or refused.

Weight types: ``f32``, ``bf16``, ``f16``, ``q8_0``; norms stay ``f32``. The
latent projection ``attn_kv_a_mqa`` holds weights around 1e-8 (the linear-regime
latent norm), which float16 and q8_0's float16 block scales flush to zero: it is
stored in ``bf16`` under those two types (and ``f32``/``bf16`` otherwise).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..architectures import is_mla
from ..errors import UserError
from .pretokenizer import identify as identify_pre_tokenizer
from .rope_table import is_unit_yarn

LLAMACPP_PIN = "llama.cpp as vendored in llama-cpp-python 0.3.36 (PyPI sdist)"
OUTTYPES = ("f32", "bf16", "f16", "q8_0")
LITE_LAYER_COUNTS = (26, 27)  # llama.cpp treats these as DeepSeek-V2-Lite (no q_lora_rank key read)


@dataclass
class GGUFReport:
    output: str
    source: str
    outtype: str
    tensors: int
    tied_output: bool
    tokenizer_from: str
    kv_lora_rank: int
    qk_rope_head_dim: int
    cache_values_per_token: int  # all layers: (kv_lora_rank + qk_rope_head_dim) * n_layers
    tensor_types: dict = field(default_factory=dict)  # GGUF type name -> tensor count
    deepseek: dict | None = None  # the engine-form export report, when this run made it
    notes: list[str] = field(default_factory=list)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a declared dependency; say how to get it rather than a traceback
        raise UserError("the 'gguf' package is missing; pip install 'gguf>=0.10'") from e
    return gguf


def export_gguf(model_dir: str, out_file: str, outtype: str = "f32", overwrite: bool = False, *,
                tokenizer_gguf: str | None = None, pad_ranks: bool = False, verify_tokens: int = 64) -> GGUFReport:
    """Write ``out_file`` (``.gguf``) from a native MLA checkpoint or an engine-form DeepSeek-V3 export."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF type '{outtype}'; choose one of {', '.join(OUTTYPES)}")
    out = Path(out_file)
    if out.suffix != ".gguf":
        raise UserError(f"the GGUF output must be a file ending in .gguf, got '{out}'")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    src = Path(model_dir)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{src} has no config.json; pass a directory written by `mla-retrofit convert` or `export`")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_tokenizer(src, tokenizer_gguf)  # before minutes of export
    if is_mla(raw):
        from .deepseek import export_deepseek

        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.ds-") as tmp:
            ds_dir = Path(tmp) / "deepseek"
            ds = export_deepseek(str(src), str(ds_dir), pad_ranks=pad_ranks, engine=True, verify_tokens=verify_tokens,
                                 dtype="float32")
            report = GGUFWriterJob(ds_dir, out, outtype, tokenizer_gguf, native=src).run()
            report.deepseek = asdict(ds)
            report.notes = list(ds.notes) + report.notes
        return report
    if model_type == "deepseek_v3":
        return GGUFWriterJob(src, out, outtype, tokenizer_gguf, native=None).run()
    raise UserError(f"{src} is a '{model_type}' checkpoint; export a native MLA checkpoint (from `mla-retrofit convert`) "
                    "or its engine-form DeepSeek-V3 export (`export --engine`)")


def find_source_gguf(dirs: list[Path], tokenizer_gguf: str | None) -> Path | None:
    """The GGUF whose tokenizer keys are copied: ``tokenizer_gguf``, else the recorded source model's own GGUF."""
    if tokenizer_gguf:
        path = Path(tokenizer_gguf)
        if not path.is_file():
            raise UserError(f"--tokenizer-gguf {path} does not exist")
        return path
    from ..sources import EMBEDDED_DEFAULT, embedded_gguf_path

    for name in source_names(dirs):
        if name == EMBEDDED_DEFAULT:
            return embedded_gguf_path()
        if name.endswith(".gguf") and Path(name).is_file():
            return Path(name)
    return None


def source_names(dirs: list[Path]) -> list[str]:
    """The original model's name as recorded by convert, export or heal (a heal's teacher is the original)."""
    names = []
    for d in dirs:
        for rec, keys in (("conversion.json", ("source_model",)), ("export.json", ("source_model",)),
                          ("conversion.json", ("heal", "teacher"))):
            value = json.loads((d / rec).read_text()) if (d / rec).is_file() else {}
            for k in keys:
                value = value.get(k) if isinstance(value, dict) else None
            if isinstance(value, str):
                names.append(value)
    return names


def check_tokenizer(src: Path, tokenizer_gguf: str | None) -> None:
    """Refuse up front a tokenizer.json whose splitting no llama.cpp pre-tokenizer reproduces (no GGUF to copy)."""
    if find_source_gguf([src], tokenizer_gguf) is None and (src / "tokenizer.json").is_file():
        identify_pre_tokenizer(src / "tokenizer.json")


class GGUFWriterJob:
    """One DeepSeek-V3 engine-form directory -> one GGUF file (written to a temporary name, then renamed)."""

    def __init__(self, ds_dir: Path, out: Path, outtype: str, tokenizer_gguf: str | None, native: Path | None):
        from ..sources import SafetensorsWeights

        self.gguf = _gguf()
        self.dir, self.out, self.outtype, self.native = ds_dir, out, outtype, native
        self.cfg = json.loads((ds_dir / "config.json").read_text())
        self.weights = SafetensorsWeights(ds_dir)
        self.tokenizer_gguf = tokenizer_gguf
        self.notes: list[str] = []
        self.types: dict[str, int] = {}
        self.refuse()

    # -- what llama.cpp's deepseek2 cannot run ---------------------------------------------------------
    def refuse(self) -> None:
        c = self.cfg
        biases = [k for k in self.weights.names() if k.endswith(".bias")]
        if biases or c.get("attention_bias"):
            raise UserError(
                f"{self.dir} carries attention biases ({len(biases)} tensors) and llama.cpp's deepseek2 has none: "
                "export the engine form (`mla-retrofit export NATIVE OUT --engine`) or pass the native checkpoint"
            )
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default" and not is_unit_yarn(rope):  # factor-1 yarn is the plain table
            raise UserError(
                f"RoPE scaling '{rope.get('rope_type')}' has no llama.cpp deepseek2 form (it applies only DeepSeek's "
                "yarn): serve this model with transformers, or convert a source without RoPE scaling"
            )
        if not c.get("rope_interleave", True):
            raise UserError("llama.cpp rotates DeepSeek's RoPE pairs interleaved: export with rope_interleave=True "
                            "(drop --no-rope-interleave)")
        if c.get("first_k_dense_replace") != c["num_hidden_layers"]:
            raise UserError("only dense exports (first_k_dense_replace = num_hidden_layers) are supported")
        if c["num_hidden_layers"] in LITE_LAYER_COUNTS and c.get("q_lora_rank") is not None:
            raise UserError(f"llama.cpp reads a {c['num_hidden_layers']}-layer deepseek2 as 'Lite' (no q_lora): "
                            "this export's q_lora path cannot load there")

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> GGUFReport:
        g, c = self.gguf, self.cfg
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        writer = g.GGUFWriter(str(tmp), g.MODEL_ARCH_NAMES[g.MODEL_ARCH.DEEPSEEK2])
        try:
            self.write_params(writer)
            tok_from = self.write_tokenizer(writer)
            tied = self.write_tensors(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
            os.replace(tmp, self.out)
        finally:
            if tmp.exists():
                tmp.unlink()
        return GGUFReport(
            output=str(self.out), source=str(self.native or self.dir), outtype=self.outtype,
            tensors=sum(self.types.values()), tied_output=tied, tokenizer_from=tok_from,
            kv_lora_rank=c["kv_lora_rank"], qk_rope_head_dim=c["qk_rope_head_dim"],
            cache_values_per_token=c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]),
            tensor_types=dict(self.types), notes=self.notes,
        )

    def write_params(self, w) -> None:
        g, c = self.gguf, self.cfg
        n_layers = c["num_hidden_layers"]
        rope = c.get("rope_parameters") or {}
        w.add_name(f"MLA retrofit of {self.native or self.dir}")
        w.add_string("general.source.mla_retrofit", f"mla-retrofit {__version__}; loader checked: {LLAMACPP_PIN}")
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_block_count(n_layers)
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(1)  # MLA with absorption is MQA over the latent
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
        w.add_rope_dimension_count(c["qk_rope_head_dim"])
        w.add_vocab_size(c["vocab_size"])
        w.add_leading_dense_block_count(n_layers)
        w.add_q_lora_rank(c.get("q_lora_rank") or 0)
        w.add_kv_lora_rank(c["kv_lora_rank"])
        w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
        w.add_value_length(c["kv_lora_rank"])
        w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_feed_forward_length(c.get("moe_intermediate_size") or c["intermediate_size"])
        w.add_expert_shared_count(0)
        w.add_file_type({"f32": g.LlamaFileType.ALL_F32, "bf16": g.LlamaFileType.MOSTLY_BF16,
                         "f16": g.LlamaFileType.MOSTLY_F16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0}[self.outtype])
        w.add_quantization_version(g.GGML_QUANT_VERSION)

    # -- tokenizer -----------------------------------------------------------------------------------
    def source_gguf(self) -> Path | None:
        return find_source_gguf([d for d in (self.native, self.dir) if d is not None], self.tokenizer_gguf)

    def write_tokenizer(self, w) -> str:
        src = self.source_gguf()
        if src is not None:
            reader = self.gguf.GGUFReader(str(src))
            for key, f in reader.fields.items():
                if key.startswith("tokenizer."):
                    sub = f.types[1] if len(f.types) > 1 else None
                    w.add_key_value(key, f.contents(), f.types[0], sub)
            return str(src)
        return self.write_hf_tokenizer(w)

    def write_hf_tokenizer(self, w) -> str:
        g = self.gguf
        folder = self.native or self.dir
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"no tokenizer in {folder}: pass --tokenizer-gguf with any GGUF of the source model")
        try:
            vocab = g.vocab.BpeVocab(folder)
        except Exception as e:  # not byte-level BPE (e.g. SentencePiece): llama.cpp's converter knows those
            raise UserError(f"the tokenizer in {folder} is not byte-level BPE ({e}); pass --tokenizer-gguf with a GGUF "
                            "of the source model (llama.cpp's convert_hf_to_gguf.py writes one)") from e
        special = {t["content"] for t in json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
                   if t.get("special")}
        tokens, types = [], []
        for text, _score, ttype in vocab.all_tokens():
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            tokens.append(text)
            types.append(int(g.TokenType.CONTROL) if text in special else int(ttype))
        n_vocab = self.cfg["vocab_size"]
        tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
        types += [int(g.TokenType.UNUSED)] * (n_vocab - len(types))
        pre = identify_pre_tokenizer(folder / "tokenizer.json")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre.name)
        w.add_token_list(tokens[:n_vocab])
        w.add_token_types(types[:n_vocab])
        g.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(w)
        self.notes.append(f"tokenizer built from tokenizer.json; llama.cpp pre-tokenizer '{pre.name}' (the one that "
                          "splits a probe text exactly as tokenizer.json does)")
        return str(folder / "tokenizer.json")

    # -- tensors -------------------------------------------------------------------------------------
    def write_tensors(self, w) -> bool:
        c = self.cfg
        names = self.gguf.get_tensor_name_map(self.gguf.MODEL_ARCH.DEEPSEEK2, c["num_hidden_layers"])
        embed = self.weights.get("model.embed_tokens.weight")
        tied = self.weights.has("lm_head.weight") and torch.equal(self.weights.get("lm_head.weight"), embed)
        for name in self.weights.names():
            if name == "lm_head.weight" and tied:
                continue
            t = self.weights.get(name)
            if name.endswith("kv_b_proj.weight"):
                h, nope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
                kv_b = t.view(h, nope + v, t.shape[-1])
                k_b, v_b = kv_b.split([nope, v], dim=1)
                self.add(w, names, name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2))
                self.add(w, names, name.replace("kv_b_proj", "v_b_proj"), v_b)
            else:
                self.add(w, names, name, t)
        return tied

    def add(self, w, names, hf_name: str, t: torch.Tensor) -> None:
        g = self.gguf
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"tensor '{hf_name}' has no llama.cpp deepseek2 name; this export cannot be written as GGUF")
        qtype = self.tensor_type(new, t)
        data = t.contiguous().float().numpy()
        if qtype == g.GGMLQuantizationType.F32:
            w.add_tensor(new, data.astype(np.float32), raw_dtype=qtype)
        elif qtype == g.GGMLQuantizationType.F16:
            w.add_tensor(new, data.astype(np.float16), raw_dtype=qtype)
        else:
            q = g.quants.quantize(data, qtype)
            w.add_tensor(new, q, raw_dtype=qtype)  # the writer derives the shape from the bytes
        self.types[qtype.name] = self.types.get(qtype.name, 0) + 1

    def tensor_type(self, gguf_name: str, t: torch.Tensor):
        q = self.gguf.GGMLQuantizationType
        want = {"f32": q.F32, "bf16": q.BF16, "f16": q.F16, "q8_0": q.Q8_0}[self.outtype]
        if t.dim() == 1:
            return q.F32  # norms
        if "attn_kv_a_mqa" in gguf_name and want in (q.F16, q.Q8_0):
            return q.BF16  # linear-regime latent weights (~1e-8) need bf16's exponent range
        if want == q.Q8_0 and t.shape[-1] % 32:
            return q.F16  # q8_0 blocks run along rows of 32
        return want

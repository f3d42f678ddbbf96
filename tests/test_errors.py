"""Bad input gets one clear line and leaves nothing half-written."""

import json

import pytest
import torch

from mla_retrofit import checkpoint, data
from mla_retrofit.convert.pipeline import ConvertConfig, Converter, convert
from mla_retrofit.errors import UserError
from tiny import tiny_tokenizer

FAST = dict(calib_samples=4, calib_seq_len=64, eval_samples=1, eval_seq_len=32)


def _cfg(src, out, **kw):
    return ConvertConfig(model=str(src), output=str(out), **{"kv_ratio": 0.5, **FAST, **kw})


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3, mistral"):
        Converter(_cfg(tmp_path / "gpt2", tmp_path / "o"))


def test_already_mla_is_refused(converted, tmp_path):
    with pytest.raises(UserError, match="already an MLA retrofit"):
        Converter(_cfg(converted("llama", 0.5), tmp_path / "o"))


def test_mha_source_converts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "mha")
    tiny_tokenizer().save_pretrained(tmp_path / "mha")
    res = convert(_cfg(tmp_path / "mha", tmp_path / "o"))
    assert res.kv_converted == 32 and res.kv_original == 64


def test_missing_and_truncated_shards(tiny_src, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_src("llama")))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(tmp_path / "sharded")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].rename(tmp_path / "away.safetensors")
    with pytest.raises(UserError, match=r"shard\(s\) missing .*re-download"):
        Converter(_cfg(tmp_path / "sharded", tmp_path / "o"))
    (tmp_path / "away.safetensors").rename(shards[1])
    blob = shards[1].read_bytes()
    shards[1].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        convert(_cfg(tmp_path / "sharded", tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_existing_output_needs_overwrite(tiny_src, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists .* --overwrite"):
        convert(_cfg(tiny_src("llama"), out))
    assert (out / "keep.txt").read_text() == "mine"
    convert(_cfg(tiny_src("llama"), out, overwrite=True))
    assert (out / "conversion.json").is_file() and not (out / "keep.txt").exists()


def test_disk_full_at_the_end_leaves_no_output_and_resume_finishes(tiny_src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real_close = checkpoint.ShardWriter.close

    def crash(self, *a, **k):
        if self.directory.name.startswith(".o.tmp-"):  # the output's shards, not the partial run's layer files
            self.flush()
            raise OSError(28, "No space left on device")
        return real_close(self, *a, **k)

    monkeypatch.setattr(checkpoint.ShardWriter, "close", crash)
    with pytest.raises(OSError):
        convert(_cfg(tiny_src("llama"), out))
    assert not out.exists() and not _leftovers(tmp_path)
    assert (tmp_path / ".o.partial").is_dir()  # every layer's work is kept
    monkeypatch.setattr(checkpoint.ShardWriter, "close", real_close)
    with pytest.raises(UserError, match="add --resume to continue it"):
        convert(_cfg(tiny_src("llama"), out))
    convert(_cfg(tiny_src("llama"), out, resume=True))
    assert json.loads((out / "conversion.json").read_text())["source_model"] == str(tiny_src("llama"))
    assert not (tmp_path / ".o.partial").exists()


def test_stale_temp_dir_from_a_killed_run_is_cleaned(tiny_src, tmp_path):
    stale = tmp_path / ".o.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    convert(_cfg(tiny_src("llama"), tmp_path / "o"))
    assert not stale.exists() and (tmp_path / "o" / "conversion.json").is_file()


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".jsonl", "is empty"),
        ('{"prompt": "hi"}\n', ".jsonl", "expected a 'text' column or a 'messages' column"),
        ('{"messages": "hello"}\n', ".jsonl", "list of {role, content}"),
        ("short", ".txt", "fewer than one window"),
        ("{not json", ".jsonl", "not valid JSON"),
    ],
)
def test_bad_calibration_data(content, suffix, message, tiny_src, tmp_path):
    f = tmp_path / f"calib{suffix}"
    f.write_text(content)
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        convert(_cfg(tiny_src("llama"), tmp_path / "o", calib=str(f)))
    assert not (tmp_path / "o").exists()


def test_unreachable_dataset_says_offline_and_suggests_local(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline.*local .jsonl"):
        data.texts("HuggingFaceTB/smoltalk")


def test_unreachable_model_says_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        Converter(_cfg("someone/some-model", tmp_path / "o"))


def test_missing_local_model(tmp_path):
    with pytest.raises(UserError, match="not found|does not exist"):
        Converter(_cfg(tmp_path / "nothing-here.gguf", tmp_path / "o"))


def test_bench_runtime_choice_and_errors(monkeypatch):
    from mla_retrofit.bench import run

    cpu = run.runtime(run.BenchConfig(model="m", device="cpu"))
    assert (cpu[0].type, cpu[1], cpu[2]) == ("cpu", torch.float32, "sdpa")
    assert run.runtime(run.BenchConfig(model="m", device="cpu", weights_dtype="bfloat16", attn="eager"))[1:] == (
        torch.bfloat16, "eager")
    # On a CUDA machine the defaults are CUDA, bf16 and flash-attn when it is installed (simulated here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run, "flash_attn_available", lambda: True)
    gpu = run.runtime(run.BenchConfig(model="m"))
    assert (gpu[0].type, gpu[1], gpu[2]) == ("cuda", torch.bfloat16, "flash_attention_2")
    assert run.runtime(run.BenchConfig(model="m", weights_dtype="float32"))[2] == "sdpa"  # flash-attn needs 16-bit
    monkeypatch.setattr(run, "flash_attn_available", lambda: False)
    assert run.runtime(run.BenchConfig(model="m"))[2] == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for kw, msg in ((dict(device="cuda"), "no CUDA device"), (dict(device="tpu"), "--device"),
                    (dict(weights_dtype="int4"), "--weights-dtype"), (dict(attn="flash"), "--attn"),
                    (dict(attn="flash_attention_2"), "flash-attn"), (dict(speed_cache="paged"), "--speed-cache")):
        with pytest.raises(UserError, match=msg):
            run.BenchConfig(model="m", **kw).validate()


# --- issue 15: the remaining bad inputs -------------------------------------------------------------------
def test_dtype_spellings_are_accepted_and_a_wrong_one_is_one_line(tiny_src, tmp_path):
    cfg = _cfg(tiny_src("llama"), tmp_path / "o", dtype="bf16")
    cfg.validate()
    assert cfg.dtype == "bfloat16"
    convert(cfg)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="--dtype must be one of"):
        _cfg(tiny_src("llama"), tmp_path / "p", dtype="int8").validate()


@pytest.mark.parametrize("field", ["batch_size", "calib_samples", "eval_samples", "kv_dim", "rank"])
def test_non_positive_sizes_are_refused(tiny_src, tmp_path, field):
    budget = {"kv_ratio": None} if field in ("kv_dim", "rank") else {}
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')} must be"):
        _cfg(tiny_src("llama"), tmp_path / "o", **{field: 0, **budget}).validate()


def test_untied_source_without_lm_head_fails_before_any_work(tiny_src, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_src("llama"), src)  # tiny llama: tie_word_embeddings false
    state = load_file(src / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="untied embeddings.*no 'lm_head.weight'"):
        convert(_cfg(src, tmp_path / "o"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial run


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(UserError, match="appeared while this run was writing"):
        with checkpoint.atomic_dir(out) as tmp:
            (tmp / "result").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("keep me")
    assert (out / "theirs").read_text() == "keep me"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("o.conflict-")]
    assert len(kept) == 1 and (kept[0] / "result").read_text() == "new"
    with checkpoint.atomic_dir(out, overwrite=True) as tmp:  # --overwrite replaces it
        (tmp / "result").write_text("newer")
    assert (out / "result").read_text() == "newer" and not (out / "theirs").exists()


def test_a_crash_inside_the_swap_loses_nothing(tmp_path):
    out = tmp_path / "o"
    (tmp_path / ".o.old-1234abcd").mkdir()  # killed after moving the old output aside ...
    (tmp_path / ".o.old-1234abcd" / "weights").write_text("old")
    (tmp_path / ".o.tmp-5678ef90").mkdir()  # ... and before moving the new one in
    checkpoint.clean_stale(out)
    assert (out / "weights").read_text() == "old" and not _leftovers(tmp_path)
    (tmp_path / ".o.old-99999999").mkdir()  # a trash directory next to an existing output is removed
    checkpoint.clean_stale(out)
    assert not _leftovers(tmp_path) and (out / "weights").read_text() == "old"

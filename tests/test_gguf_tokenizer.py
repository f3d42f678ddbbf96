"""The GGUF export describes the source's own tokenizer: llama.cpp's pre-tokenizer told by behaviour, or a refusal.

The llama.cpp check (``llamacpp``) runs the pinned ``llama-tokenize`` when ``benchmarks/llamacpp_build.sh`` has
built it (cached outside the repo) and is skipped otherwise, as in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mla_retrofit.errors import UserError
from mla_retrofit.export import export_gguf
from mla_retrofit.export.pretokenizer import identify
from test_engine_export import ENGINE, read_gguf
from tiny import tiny_tokenizer

EXPECTED = {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}
HELD_OUT = ("On 3 March 2031 the committee's report -- all 1,204 pages -- wasn't read; they'd said \"it's 99.5% "
            "done\".\n\n  def g(y):\n\treturn {'a': [10, 200, 3000]}  # ok?!\r\nNaïve Zoë paid €45 at 7:30pm... 東京 🙂\n")


def with_tokenizer(native: Path, pre: str, dest: Path) -> Path:
    shutil.copytree(native, dest)
    tiny_tokenizer(pre).save_pretrained(str(dest))
    return dest


@pytest.mark.parametrize("pre", sorted(EXPECTED))
def test_pre_tokenizer_is_told_by_behaviour(tmp_path, pre):
    tiny_tokenizer(pre).save_pretrained(str(tmp_path))
    assert identify(tmp_path / "tokenizer.json").name == EXPECTED[pre]


def test_gguf_writes_the_identified_pre_tokenizer(converted, tmp_path):
    native = with_tokenizer(converted("llama", 0.5, **ENGINE),
                            "qwen2", tmp_path / "native")
    rep = export_gguf(str(native), str(tmp_path / "m.gguf"), verify_tokens=0)
    _, fields, _ = read_gguf(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert rep.tokenizer_from.endswith("tokenizer.json") and any("'qwen2'" in n for n in rep.notes)


def test_unidentifiable_pre_tokenizer_is_refused_before_any_work(converted, tmp_path):
    native = with_tokenizer(converted("llama", 0.5, **ENGINE),
                            "whitespace", tmp_path / "native")
    with pytest.raises(UserError, match="--tokenizer-gguf") as err:
        export_gguf(str(native), str(tmp_path / "m.gguf"))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # no temporary export, no output
    spec = json.loads((native / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (native / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="normalizes text"):
        export_gguf(str(native), str(tmp_path / "m.gguf"))


def llama_tokenize_bin() -> Path | None:
    home = Path(os.environ.get("LLAMACPP_HOME", Path.home() / ".cache/mla-retrofit/llamacpp"))
    found = sorted(home.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-tokenize"))
    return found[-1] if found else None


@pytest.mark.llamacpp
@pytest.mark.skipif(llama_tokenize_bin() is None, reason="llama.cpp not built (benchmarks/llamacpp_build.sh)")
@pytest.mark.parametrize("pre", sorted(EXPECTED))
def test_llamacpp_tokenizes_held_out_text_into_the_hf_ids(converted, tmp_path, pre):
    native = with_tokenizer(converted("llama", 0.5, **ENGINE),
                            pre, tmp_path / "native")
    export_gguf(str(native), str(tmp_path / "m.gguf"), verify_tokens=0)
    (tmp_path / "text.txt").write_text(HELD_OUT)
    proc = subprocess.run([str(llama_tokenize_bin()), "-m", str(tmp_path / "m.gguf"), "-f", str(tmp_path / "text.txt"),
                           "--ids", "--no-bos", "--log-disable"], capture_output=True, text=True, check=True)
    ids = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("[")))
    assert ids == tiny_tokenizer(pre)(HELD_OUT, add_special_tokens=False)["input_ids"]

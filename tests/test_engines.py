"""Where a shape runs: padding to each engine's head sizes, and the cache it then costs."""

from mla_retrofit.engines import serving_table


def rows(ranks, ropes, original):
    return {r["engine"]: r for r in serving_table(ranks, ropes, original)}


def test_fixed_head_sizes_pad_the_latent_and_the_rope_key():
    got = rows([128, 160], [48, 48], original=2 * 384)
    native = got["transformers, native MLA (this project)"]
    assert native["shape"] == "per layer" and native["values_per_token"] == 128 + 160 + 96
    assert got["llama.cpp deepseek2 (GGUF)"]["shape"] == (160, 48)  # padded to the largest rank only
    cpu = got["vLLM CPU: AMX_MLA, CPU_MLA"]
    assert cpu["shape"] == (512, 64) and cpu["values_per_token"] == 2 * 576 and cpu["vs_original"] == 1.5
    assert got["vLLM GPU: FLASHMLA, CUTLASS_MLA, FLASHINFER_MLA"]["shape"] == (256, 64)  # smallest of 320/512/576 that holds rank 160


def test_a_shape_no_backend_holds_is_said_so():
    got = rows([600], [64], original=2048)
    assert not got["vLLM CPU: AMX_MLA, CPU_MLA"]["runs"] and got["vLLM GPU: TRITON_MLA"]["runs"]
    assert not rows([100], [96], original=2048)["vLLM CPU: AMX_MLA, CPU_MLA"]["runs"]  # RoPE wider than 64


def test_inspect_lists_engines(tiny_src):
    import json

    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["inspect", str(tiny_src("qwen2")), "--kv-ratio", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    names = [r["engine"] for r in json.loads(res.output)["engines"]]
    assert "vLLM CPU: AMX_MLA, CPU_MLA" in names
